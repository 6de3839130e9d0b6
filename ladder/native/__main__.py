"""`python -m ladder.native`: build the library now (make setup) and say how it went."""

from ladder.native import gemm_dtypes, library_path, load, unavailable_reason

lib = load()
if lib is None:
    print(f"ladder.native: unavailable ({unavailable_reason()}); torch's operators are used")
else:
    names = sorted(str(d).removeprefix("torch.") for d in gemm_dtypes(lib))
    quant = "AVX512-VNNI" if lib.ladder_qgemm_vnni() else "plain C"
    print(f"ladder.native: {library_path()} (weight products: {', '.join(names) or 'none'}; "
          f"quantized: {quant})")
