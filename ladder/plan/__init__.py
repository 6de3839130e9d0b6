"""`ladder plan`: an analytical model of a tensor-parallel decode step, no Ray, no torch
(but for `--calibrate`, which runs the engine).

    models     model presets (published shapes) and reading a config.json
    hardware   device presets (datasheets) and the calibrated compute terms
    links      link presets and NCCL's all-reduce cost model
    measured   the measured.json `--calibrate` writes, and reading it
    calibrate  `--calibrate`: this machine into a measured.json, with the link timer a
               higher layer provides
    rank_timing  what each rank's process times for it (torch, imported when run)
    costs      each module's bytes, FLOPs and seconds on the slowest rank
    step       one decode step played out under a residual plan
    sweep      rows per plan x batch x context, as JSON fields and a table
    quality    a plan's quality cost from a recovery curve
    plot       speedup against link bandwidth
    cli        the `ladder plan` command
"""
