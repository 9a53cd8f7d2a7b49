"""``memo env``: which backends memo uses on this machine, and the versions of its integrations."""

from __future__ import annotations

import json


def env_command_parser(subparsers) -> None:
    p = subparsers.add_parser("env", help="show memo's active backends and why")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=env_command)


def env_command(args) -> int:
    import memo
    info = memo.backend_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, dict):   # one line per entry, indented under the key
                print(k)
                inner = max(len(str(i)) for i in v)
                for i, x in v.items():
                    print(f"  {i:<{inner}}  {x}")
            else:
                print(f"{k:<{width}}  {v}")
    return 0
