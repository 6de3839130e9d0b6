"""`ladder dashboards push`: upload the generated dashboards to Grafana with grafana-client.

Idempotent: the folder is found by uid or created, and each dashboard is written with
`overwrite: true` under its fixed uid, so pushing twice leaves one copy of each. Failures say
what went wrong (unreachable URL, rejected token, refused request) and exit 1.
"""

from __future__ import annotations

import json
import sys

from dashboards.build import HERE
from dashboards.spec import DASHBOARDS

FOLDER_UID, FOLDER_TITLE = "ladder-serve", "ladder-serve"


class PushError(RuntimeError):
    pass


def push(url: str, token: str, timeout_s: float = 10.0) -> list[str]:
    """Push every dashboard; returns the uids written. Raises PushError with a clear message."""
    from grafana_client import GrafanaApi
    from grafana_client.client import (GrafanaClientError, GrafanaException,
                                       GrafanaUnauthorizedError)
    try:
        api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    except Exception as e:  # a URL it cannot parse
        raise PushError(f"{url}: not a usable Grafana URL ({e})") from None
    try:
        try:
            api.folder.get_folder(FOLDER_UID)
        except GrafanaClientError as e:
            if getattr(e, "status_code", None) != 404:
                raise
            api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
        done = []
        for name in DASHBOARDS:
            dash = json.loads((HERE / f"{name}.json").read_text())
            api.dashboard.update_dashboard({"dashboard": dash, "folderUid": FOLDER_UID,
                                            "overwrite": True,
                                            "message": "ladder dashboards push"})
            done.append(dash["uid"])
        return done
    except GrafanaUnauthorizedError:
        raise PushError(f"{url}: Grafana rejected the token (401): pass a service-account "
                        "token with Editor rights as --token") from None
    except GrafanaException as e:
        raise PushError(f"{url}: Grafana refused the request: {e}") from None
    except OSError as e:
        raise PushError(f"{url}: cannot reach Grafana ({type(e).__name__}: {e})") from None
    except Exception as e:  # niquests' connection errors are not OSErrors
        if "connect" in type(e).__name__.lower() or "connect" in str(e).lower():
            raise PushError(f"{url}: cannot reach Grafana ({type(e).__name__})") from None
        raise


def run(args) -> int:
    try:
        uids = push(args.url, args.token, args.timeout)
    except PushError as e:
        print(f"ladder dashboards push: {e}", file=sys.stderr)
        return 1
    print(f"pushed {', '.join(uids)} into folder {FOLDER_UID!r} at {args.url}")
    return 0
