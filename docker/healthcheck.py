"""Container health check: exit 0 when GET URL answers 2xx, else 1 (no curl in the images).

    python3 /opt/cpl/healthcheck.py http://127.0.0.1:8001/ready

The URL comes from the first argument, else $HEALTHCHECK_URL (each image sets a default).
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HEALTHCHECK_URL", "")
    if not url:
        print("healthcheck: no URL (argument or HEALTHCHECK_URL)", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as answer:
            return 0 if 200 <= answer.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
