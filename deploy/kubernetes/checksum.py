"""Print (or with --write, set) the Deployment's checksum/config annotation: the sha256 of the ConfigMap's
gateway.toml, so that changing the config rolls the pods.

    python deploy/kubernetes/checksum.py [--write]
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def config_checksum() -> str:
    configmap = yaml.safe_load((HERE / "configmap.yaml").read_text())
    return hashlib.sha256(configmap["data"]["gateway.toml"].encode()).hexdigest()


def main() -> int:
    digest = config_checksum()
    if "--write" in sys.argv:
        path = HERE / "deployment.yaml"
        text = re.sub(r'(checksum/config: )"[0-9a-f]*"', rf'\1"{digest}"', path.read_text())
        path.write_text(text)
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
