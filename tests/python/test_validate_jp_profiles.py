#!/usr/bin/env python3
"""Proves validate_jp_profiles.py on the publishers' examples and on broken variants of them.

The JP Core v1.1.2 examples (URL code systems) and the eCheckup sample report must pass. Each
broken variant breaks one rule its profile really states (checked against the vendored
StructureDefinition: the element, its cardinality, its fixed or pattern value, the slice) and
must fail with that element named. The fixtures are never edited: variants are made here, in
temporary files.

The validator's known gaps are pinned too (the `test_gap_*` cases): each variant breaks its
profile and the validator lets it through, which those tests assert. If one of them starts to
fail, the validator has learnt the rule: turn the case into a broken variant that must fail and
update the docstring of validate_jp_profiles.py.

Runs with `python3 -m unittest tests/python/test_validate_jp_profiles.py` (or as a script), with
what `.ci/run` installs (`npm ci --prefix tests/python`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCRIPT = HERE / "validate_jp_profiles.py"
URL_EXAMPLES = ROOT / "fixtures" / "jp-core-1.1.2" / "url"
OID_EXAMPLES = ROOT / "fixtures" / "jp-core-1.1.2" / "oid"
ECHECKUP_SAMPLE = ROOT / "fixtures" / "echeckup-report" / "Bundle-Bundle-eCheckupReport-Sample-01.json"
CORE = "http://jpfhir.jp/fhir/core/StructureDefinition/"


def example(name: str) -> dict:
    return json.loads((URL_EXAMPLES / name).read_text(encoding="utf-8"))


def patient() -> dict:
    return example("Patient-jp-patient-example-1.json")


def lab_result() -> dict:
    return example("Observation-jp-observation-labresult-example-1.json")


def medication_request() -> dict:
    return example("MedicationRequest-jp-medicationrequest-example-1.json")


def run(*paths: Path | str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, *(str(p) for p in paths)],
        capture_output=True,
        text=True,
        check=False,
    )


class ValidateJpProfiles(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory()
        probe = run(URL_EXAMPLES / "Patient-jp-patient-example-1.json")
        if probe.returncode == 3:
            raise AssertionError(f"the validator is not installed: {probe.stderr.strip()}")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.tmp.cleanup()

    def write(self, name: str, resource: dict) -> Path:
        path = Path(self.tmp.name) / name
        path.write_text(json.dumps(resource, ensure_ascii=False), encoding="utf-8")
        return path

    def fails(self, resource: dict, *expected: str) -> str:
        """`resource` must fail, with a failure line holding every string in `expected`."""
        result = run(self.write(f"{self.id().rsplit('.', 1)[-1]}.json", resource))
        self.assertEqual(result.returncode, 1, f"expected a failure:\n{result.stdout}{result.stderr}")
        lines = [line for line in result.stdout.splitlines() if line.startswith("FAIL ")]
        self.assertTrue(
            any(all(text in line for text in expected) for line in lines),
            f"no failure line with {expected}:\n{result.stdout}",
        )
        return result.stdout

    def passes(self, resource: dict) -> str:
        result = run(self.write(f"{self.id().rsplit('.', 1)[-1]}.json", resource))
        self.assertEqual(result.returncode, 0, f"expected a pass:\n{result.stdout}{result.stderr}")
        return result.stdout

    # The publishers' examples.

    def test_jp_core_url_examples_pass(self) -> None:
        result = run(URL_EXAMPLES)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("18 profile checks in 16 files, 0 failed, 0 not checked", result.stdout)

    def test_jp_core_oid_examples_fail_only_on_the_url_identifier_systems(self) -> None:
        # The vendored profiles are those of the URL variant of the package (what the gateway
        # exports): JP_MedicationRequest and JP_MedicationDispense fix the systems of their
        # rpNumber and orderInRp identifiers to http://jpfhir.jp/fhir/core/mhlw/IdSystem/...,
        # where the OID variant's examples (and profiles) use urn:oid:1.2.392.100495.20.3.81/82.
        result = run(OID_EXAMPLES)
        self.assertEqual(result.returncode, 1)
        failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL ")]
        self.assertEqual(len(failures), 4, result.stdout)
        for line in failures:
            self.assertRegex(line, r"Medication(Request|Dispense)\.identifier: .*slice '(rpNumber|orderInRp)'")
        self.assertIn("18 profile checks in 16 files, 2 failed", result.stdout)

    def test_echeckup_sample_report_passes_with_its_bundle_profile(self) -> None:
        result = run(ECHECKUP_SAMPLE)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("JP_Observation_eCheckupGeneral: 44, 0", result.stdout)
        self.assertIn("JP_Composition_eCheckupGeneral: 1, 0", result.stdout)
        self.assertIn("JP_Bundle_eCheckupGeneral: 1, 0\n", result.stdout)
        self.assertNotIn("NOT CHECKED", result.stdout)
        # The validator's warnings about the Bundle's own urn:uuid: references are counted,
        # not listed.
        self.assertRegex(result.stdout, r"\(\d+ warnings left out: references to urn:uuid: entries")
        self.assertNotIn('Invalid reference: got "urn:uuid:', result.stdout)

    # JP_Bundle_eCheckupGeneral slices Bundle.entry by the profile each entry's resource
    # claims, which this script counts (the validator cannot), and the rest of the profile is
    # still the validator's.

    def echeckup_sample(self) -> dict:
        return json.loads(ECHECKUP_SAMPLE.read_text(encoding="utf-8"))

    def test_echeckup_bundle_without_its_practitioner(self) -> None:  # entry:practitioner 1..2
        bundle = self.echeckup_sample()
        bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Practitioner"]
        self.fails(bundle, "JP_Bundle_eCheckupGeneral", "Bundle.entry:practitioner", "0 items", "1..2")

    def test_echeckup_bundle_with_three_practitioners(self) -> None:
        bundle = self.echeckup_sample()
        doctor = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Practitioner")
        bundle["entry"] += [json.loads(json.dumps(doctor)), json.loads(json.dumps(doctor))]
        for index, entry in enumerate(bundle["entry"][-2:]):
            entry["fullUrl"] = f"urn:uuid:6f1c2a1e-0000-4000-8000-00000000000{index}"
        self.fails(bundle, "Bundle.entry:practitioner", "3 items", "1..2")

    def test_echeckup_bundle_whose_practitioner_claims_no_profile(self) -> None:
        # Membership is by the claimed profile: an entry that does not claim it is not counted.
        bundle = self.echeckup_sample()
        doctor = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Practitioner")
        del doctor["resource"]["meta"]["profile"]
        self.fails(bundle, "Bundle.entry:practitioner", "0 items")

    def test_echeckup_bundle_without_its_patient(self) -> None:  # entry:patient 1..1
        bundle = self.echeckup_sample()
        bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"]
        self.fails(bundle, "Bundle.entry:patient", "0 items", "1..1")

    def test_a_profile_slicing_with_two_discriminators_fails_rather_than_pass_unchecked(self) -> None:
        # A copy of the eCheckup profiles whose Bundle slices Bundle.entry by profile and by a
        # value: the script cannot count that, so the sample must fail, naming the element.
        profiles = Path(self.tmp.name) / "two-discriminators"
        profiles.mkdir(exist_ok=True)
        source = ROOT / "fixtures" / "echeckup-report" / "profiles"
        for path in source.glob("*.json"):
            definition = json.loads(path.read_text(encoding="utf-8"))
            if definition.get("name") == "JP_Bundle_eCheckupGeneral":
                for part in ("snapshot", "differential"):
                    for element in definition.get(part, {}).get("element", []):
                        if element.get("id") == "Bundle.entry" and "slicing" in element:
                            element["slicing"]["discriminator"].append({"type": "value", "path": "fullUrl"})
            (profiles / path.name).write_text(json.dumps(definition, ensure_ascii=False), encoding="utf-8")
        result = run(
            ECHECKUP_SAMPLE,
            args=("--profiles", str(ROOT / "fixtures" / "jp-core-1.1.2" / "profiles"), "--profiles", str(profiles)),
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertRegex(result.stdout, r"FAIL .*JP_Bundle_eCheckupGeneral Bundle\.entry: sliced by 2 discriminators")

    def test_echeckup_bundle_without_identifier(self) -> None:  # Bundle.identifier 1..1, still checked
        bundle = self.echeckup_sample()
        del bundle["identifier"]
        self.fails(bundle, "JP_Bundle_eCheckupGeneral", "Bundle.identifier")

    # Broken variants: each breaks a rule the profile states.

    def test_patient_without_identifier(self) -> None:  # JP_Patient: identifier 1..*
        broken = patient()
        del broken["identifier"]
        self.fails(broken, "JP_Patient", "Patient.identifier", "Missing required property")

    def test_patient_identifier_without_value(self) -> None:  # JP_Patient: identifier.value 1..1
        broken = patient()
        del broken["identifier"][0]["value"]
        self.fails(broken, "Patient.identifier[0].value", "Missing required property")

    def test_patient_with_an_unknown_element(self) -> None:
        broken = patient()
        broken["nickname"] = "はなちゃん"
        self.fails(broken, "Patient.nickname", "Invalid additional property")

    def test_lab_result_without_category(self) -> None:  # category 1..*, category:laboratory 1..1
        broken = lab_result()
        del broken["category"]
        self.fails(broken, "JP_Observation_LabResult", "Observation.category", "Missing required property")

    def test_lab_result_without_specimen(self) -> None:  # JP_Observation_LabResult: specimen 1..1
        broken = lab_result()
        del broken["specimen"]
        self.fails(broken, "Observation.specimen", "Missing required property")

    def test_lab_result_without_code_text(self) -> None:  # JP_Observation_LabResult: code.text 1..1
        broken = lab_result()
        del broken["code"]["text"]
        self.fails(broken, "Observation.code.text", "Missing required property")

    def test_medication_request_without_rp_number(self) -> None:
        # identifier sliced by system; identifier:rpNumber 1..1 with system fixed to
        # http://jpfhir.jp/fhir/core/mhlw/IdSystem/Medication-RPGroupNumber.
        broken = medication_request()
        broken["identifier"] = [i for i in broken["identifier"] if not i["system"].endswith("RPGroupNumber")]
        self.fails(broken, "MedicationRequest.identifier", "slice 'rpNumber': expected 1..1, but found 0")

    def test_medication_request_rp_number_with_another_system(self) -> None:  # the fixed system
        broken = medication_request()
        for identifier in broken["identifier"]:
            if identifier["system"].endswith("RPGroupNumber"):
                identifier["system"] = "urn:oid:1.2.392.100495.20.3.81"
        self.fails(broken, "slice 'rpNumber': expected 1..1, but found 0")

    def test_diagnostic_report_with_another_category(self) -> None:
        # category:laboratory 1..1 with pattern {system http://loinc.org, code LP29693-6}.
        broken = example("DiagnosticReport-jp-diagnosticreport-labresult-example-1.json")
        broken["category"] = [{"coding": [{"system": "http://loinc.org", "code": "LP29684-5"}]}]
        self.fails(broken, "DiagnosticReport.category", "slice 'laboratory': expected 1..1, but found 0")

    def test_condition_abated_but_active(self) -> None:
        # con-4 (severity error in JP_Condition's snapshot): an abated condition's clinical
        # status is inactive, resolved or remission.
        broken = example("Condition-jp-condition-example-1.json")
        broken["abatementDateTime"] = "2023-01-01"
        self.fails(broken, "Condition", "Constraint con-4 not met")

    def test_echeckup_fixed_and_pattern_values(self) -> None:
        # JP_Composition_eCheckupGeneral: type.coding.code fixed to 53576-5;
        # JP_Observation_eCheckupGeneral: status pattern "final";
        # JP_Encounter_eCheckupGeneral: class pattern {encounter-category, checkup}.
        bundle = json.loads(ECHECKUP_SAMPLE.read_text(encoding="utf-8"))
        first = {}
        for index, entry in enumerate(bundle["entry"]):
            first.setdefault(entry["resource"]["resourceType"], index)
        bundle["entry"][first["Composition"]]["resource"]["type"]["coding"][0]["code"] = "11502-2"
        bundle["entry"][first["Observation"]]["resource"]["status"] = "preliminary"
        bundle["entry"][first["Encounter"]]["resource"]["class"]["code"] = "AMB"
        output = self.fails(
            bundle,
            f"entry[{first['Composition']}].resource Composition/",
            "Composition.type.coding.code: Value did not match expected pattern",
        )
        self.assertRegex(output, rf"entry\[{first['Observation']}\]\.resource .*Observation\.status: Value did not match")
        self.assertRegex(output, rf"entry\[{first['Encounter']}\]\.resource .*Encounter\.class: Value did not match")
        self.assertIn("JP_Observation_eCheckupGeneral: 44, 1", output)

    def test_encounter_without_class(self) -> None:  # JP_Encounter: class 1..1
        broken = example("Encounter-jp-encounter-example-1.json")
        del broken["class"]
        self.fails(broken, "JP_Encounter", "Encounter.class", "Missing required property")

    # What the script itself decides.

    def test_a_profile_with_no_definition_fails(self) -> None:
        broken = patient()
        broken["meta"]["profile"] = ["http://jpfhir.jp/fhir/eCS/StructureDefinition/JP_Patient_eCS_Unknown"]
        self.fails(broken, "JP_Patient_eCS_Unknown: no StructureDefinition for this profile is vendored")

    def test_a_profile_for_another_type_fails(self) -> None:
        broken = patient()
        broken["meta"]["profile"] = [CORE + "JP_Condition"]
        self.fails(broken, "the profile constrains Condition, not Patient")

    def test_a_version_suffix_is_ignored(self) -> None:
        resource = patient()
        resource["meta"]["profile"] = [CORE + "JP_Patient|1.1.2"]
        self.assertIn(f"{CORE}JP_Patient: 1, 0", self.passes(resource))

    def test_a_resource_without_profile_is_not_checked(self) -> None:
        resource = patient()
        del resource["meta"]
        del resource["identifier"]
        self.assertIn("0 profile checks", self.passes(resource))

    def test_bundle_entries_are_checked_and_named(self) -> None:
        broken = patient()
        del broken["identifier"]
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"fullUrl": "urn:uuid:0", "resource": lab_result()}, {"fullUrl": "urn:uuid:1", "resource": broken}],
        }
        output = self.fails(bundle, "entry[1].resource Patient/jp-patient-example-1", "Patient.identifier")
        self.assertIn("JP_Observation_LabResult: 1, 0", output)

    def test_ndjson_failures_name_the_line(self) -> None:
        broken = lab_result()
        del broken["specimen"]
        path = Path(self.tmp.name) / "export.ndjson"
        path.write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in (patient(), broken)) + "\n", encoding="utf-8"
        )
        result = run(path)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"FAIL {path}:2 (resource) Observation/", result.stdout)

    def test_sample_limits_each_resource_type(self) -> None:
        path = Path(self.tmp.name) / "sample.ndjson"
        second = lab_result()
        second["id"] = "second"
        del second["specimen"]  # broken, but left out by --sample 1
        path.write_text("\n".join(json.dumps(r) for r in (lab_result(), second, patient())) + "\n", encoding="utf-8")
        result = run(path, args=("--sample", "1"))
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("2 profile checks in 1 files, 0 failed, 0 not checked, 1 resources left out by --sample", result.stdout)

    def test_bad_input_exits_2(self) -> None:
        path = Path(self.tmp.name) / "broken.ndjson"
        path.write_text('{"resourceType": "Patient"\n', encoding="utf-8")
        self.assertEqual(run(path).returncode, 2)
        self.assertEqual(run(Path(self.tmp.name) / "absent.json").returncode, 2)
        path.write_text('["not", "a", "resource"]\n', encoding="utf-8")
        self.assertEqual(run(path).returncode, 2)

    def test_missing_definitions_exit_3(self) -> None:
        empty = Path(self.tmp.name) / "no-profiles"
        empty.mkdir(exist_ok=True)
        result = run(URL_EXAMPLES, args=("--profiles", str(empty)))
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertIn("no StructureDefinitions in", result.stderr)

    # Known gaps of @medplum/core 4.5.2: each variant breaks its profile and still passes.
    # Asserted as passes, so that a validator that learns the rule shows up here.

    def test_gap_lab_result_with_another_category(self) -> None:
        # category:laboratory is told apart on $this with coding.system and coding.code fixed
        # below it; the validator matches any category to such a slice.
        broken = lab_result()
        broken["category"][0]["coding"][0]["code"] = "vital-signs"
        self.passes(broken)

    def test_gap_patient_with_two_birth_places(self) -> None:  # extension:birthPlace 0..1
        broken = patient()
        birth_place = {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"state": "大阪"}}
        broken["extension"].append(birth_place)
        self.passes(broken)

    def test_gap_extension_value_of_the_wrong_type(self) -> None:
        # JP_Immunization_CertificatedDate: value[x] is a date.
        broken = example("Immunization-jp-immunization-example-1.json")
        for extension in broken["extension"]:
            if extension["url"].endswith("JP_Immunization_CertificatedDate"):
                del extension["valueDate"]
                extension["valueString"] = "令和3年3月15日"
        self.passes(broken)

    def test_gap_required_binding(self) -> None:
        # Condition.clinicalStatus: required binding to condition-clinical.
        broken = example("Condition-jp-condition-example-1.json")
        broken["clinicalStatus"]["coding"][0]["code"] = "cured"
        self.passes(broken)

    def test_gap_reference_to_another_type_than_a_jp_target(self) -> None:
        # JP_Condition: subject is Reference(JP_Patient).
        broken = example("Condition-jp-condition-example-1.json")
        broken["subject"] = {"reference": "Practitioner/jp-practitioner-example-male-1"}
        self.passes(broken)

    def test_gap_fixed_code_below_a_datatype_in_a_backbone_element(self) -> None:
        # dispenseRequest.expectedSupplyDuration.code is fixed to "d".
        broken = medication_request()
        broken["dispenseRequest"]["expectedSupplyDuration"]["code"] = "wk"
        self.passes(broken)


if __name__ == "__main__":
    unittest.main()
