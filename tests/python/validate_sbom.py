"""Validates a CycloneDX SBOM with the official CycloneDX Python library's strict JSON
Schema validator (no unknown members, every required one present).

Usage: validate_sbom.py <sbom.json>; prints OK, or each error and exits 1.
"""
import sys

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        document = f.read()
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(document)
    if error:
        print(f"INVALID: {error}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
