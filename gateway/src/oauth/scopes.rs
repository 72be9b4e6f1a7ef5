//! SMART App Launch 2.2 scopes as the gateway grants them: read-only resource scopes
//! (`patient/<Type>.rs`, the v1 `.read` accepted as an alias), `system/<Type>.rs` for
//! client credentials, and the context scopes `launch/patient`, `openid`, `fhirUser`,
//! `offline_access`. Resource types are those a data category covers, or `*`. One write
//! scope exists: `system/DocumentReference.c`, for checkup institutions that upload a
//! patient's 特定健診 results under the patient's upload permission.

use std::fmt;

use phr_consent::DataCategory;

/// Which of read and search a resource scope allows (SMART v2 `r` and `s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Permissions {
    pub read: bool,
    pub search: bool,
}

impl Permissions {
    fn covered_by(self, other: Permissions) -> bool {
        (!self.read || other.read) && (!self.search || other.search)
    }

    fn suffix(self) -> &'static str {
        match (self.read, self.search) {
            (true, true) => "rs",
            (true, false) => "r",
            _ => "s",
        }
    }
}

/// Whose data a resource scope reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Context {
    /// The patient in context (authorisation code grants).
    Patient,
    /// Any patient the client is allowed (client credentials, e.g. Bulk export).
    System,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    LaunchPatient,
    OpenId,
    FhirUser,
    OfflineAccess,
    /// `system/DocumentReference.c`: send checkup documents (CDA or exchange ZIP) under a
    /// patient's upload permission. Reads nothing.
    CheckupUpload,
    Resource {
        context: Context,
        /// A FHIR resource type, or `*` for every type a category covers.
        resource_type: String,
        permissions: Permissions,
    },
}

const CHECKUP_UPLOAD: &str = "system/DocumentReference.c";

/// Why a scope string is refused (the OAuth error is always `invalid_scope`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeError(pub String);

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Scope {
    /// Parses one scope token.
    pub fn parse(token: &str) -> Result<Scope, ScopeError> {
        match token {
            "launch/patient" => return Ok(Scope::LaunchPatient),
            "openid" => return Ok(Scope::OpenId),
            "fhirUser" => return Ok(Scope::FhirUser),
            "offline_access" => return Ok(Scope::OfflineAccess),
            CHECKUP_UPLOAD => return Ok(Scope::CheckupUpload),
            _ => {}
        }
        let unknown = || ScopeError(format!("unknown scope {token:?}"));
        let (context, rest) = match token.split_once('/') {
            Some(("patient", rest)) => (Context::Patient, rest),
            Some(("system", rest)) => (Context::System, rest),
            _ => return Err(unknown()),
        };
        if rest.contains('?') {
            return Err(ScopeError(format!(
                "{token:?}: scopes with query parameters are not supported"
            )));
        }
        let (resource_type, permissions) = rest.split_once('.').ok_or_else(unknown)?;
        let permissions = match permissions {
            "rs" | "read" => Permissions {
                read: true,
                search: true,
            },
            "r" => Permissions {
                read: true,
                search: false,
            },
            "s" => Permissions {
                read: false,
                search: true,
            },
            _ => {
                return Err(ScopeError(format!(
                    "{token:?}: only read access (.rs, .r, .s or .read) is granted"
                )))
            }
        };
        if resource_type != "*" && DataCategory::of_resource_type(resource_type).is_none() {
            return Err(ScopeError(format!(
                "{token:?}: {resource_type} is not a resource type the gateway discloses"
            )));
        }
        Ok(Scope::Resource {
            context,
            resource_type: resource_type.to_string(),
            permissions,
        })
    }

    /// Whether everything this scope allows is allowed by `other`.
    pub fn covered_by(&self, other: &Scope) -> bool {
        match (self, other) {
            (
                Scope::Resource {
                    context,
                    resource_type,
                    permissions,
                },
                Scope::Resource {
                    context: other_context,
                    resource_type: other_type,
                    permissions: other_permissions,
                },
            ) => {
                context == other_context
                    && (other_type == "*" || other_type == resource_type)
                    && permissions.covered_by(*other_permissions)
            }
            _ => self == other,
        }
    }

    /// Whether any scope of `granted` covers this one.
    pub fn covered_by_any(&self, granted: &[Scope]) -> bool {
        granted.iter().any(|g| self.covered_by(g))
    }

    pub fn is_system(&self) -> bool {
        matches!(
            self,
            Scope::CheckupUpload
                | Scope::Resource {
                    context: Context::System,
                    ..
                }
        )
    }

    pub fn is_patient_resource(&self) -> bool {
        matches!(
            self,
            Scope::Resource {
                context: Context::Patient,
                ..
            }
        )
    }

    /// The data categories the scope reaches (none for context scopes).
    pub fn categories(&self) -> Vec<DataCategory> {
        match self {
            Scope::Resource { resource_type, .. } if resource_type == "*" => {
                DataCategory::ALL.to_vec()
            }
            Scope::Resource { resource_type, .. } => DataCategory::of_resource_type(resource_type)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::LaunchPatient => f.write_str("launch/patient"),
            Scope::OpenId => f.write_str("openid"),
            Scope::FhirUser => f.write_str("fhirUser"),
            Scope::OfflineAccess => f.write_str("offline_access"),
            Scope::CheckupUpload => f.write_str(CHECKUP_UPLOAD),
            Scope::Resource {
                context,
                resource_type,
                permissions,
            } => {
                let context = match context {
                    Context::Patient => "patient",
                    Context::System => "system",
                };
                write!(f, "{context}/{resource_type}.{}", permissions.suffix())
            }
        }
    }
}

/// Parses a space-separated `scope` parameter; duplicates collapse, order is canonical.
pub fn parse_scopes(scope: &str) -> Result<Vec<Scope>, ScopeError> {
    let mut scopes = scope
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(Scope::parse)
        .collect::<Result<Vec<_>, _>>()?;
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

/// The space-separated form, as stored and as returned in `scope`.
pub fn format_scopes(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(Scope::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The data categories a set of scopes reaches, each once, in category order.
pub fn categories_of(scopes: &[Scope]) -> Vec<DataCategory> {
    let mut categories: Vec<DataCategory> = scopes.iter().flat_map(Scope::categories).collect();
    categories.sort();
    categories.dedup();
    categories
}

/// Every resource scope the gateway can grant in one context, for discovery.
pub fn supported_resource_scopes(context: Context) -> Vec<String> {
    let prefix = match context {
        Context::Patient => "patient",
        Context::System => "system",
    };
    let mut scopes = vec![format!("{prefix}/*.rs")];
    if context == Context::System {
        scopes.push(CHECKUP_UPLOAD.to_string());
    }
    for category in DataCategory::ALL {
        for resource_type in category.resource_types() {
            scopes.push(format!("{prefix}/{resource_type}.rs"));
        }
    }
    scopes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v2_and_v1_read_scopes_canonically() {
        let scopes = parse_scopes(
            "patient/Observation.read launch/patient  offline_access patient/Observation.rs",
        )
        .unwrap();
        assert_eq!(
            format_scopes(&scopes),
            "launch/patient offline_access patient/Observation.rs"
        );
        assert_eq!(
            Scope::parse("system/Immunization.rs").unwrap().to_string(),
            "system/Immunization.rs"
        );
    }

    #[test]
    fn refuses_writes_unknown_types_and_query_scopes() {
        for bad in [
            "patient/Observation.write",
            "patient/Observation.cruds",
            "patient/Observation.c",
            "patient/DocumentReference.c",
            "system/DocumentReference.cruds",
            "system/Observation.c",
            "patient/Practitioner.rs",
            "user/Observation.rs",
            "patient/Observation.rs?category=laboratory",
            "launch",
            "profile",
            "patient/Observation",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn coverage_respects_context_type_and_permissions() {
        let all = Scope::parse("patient/*.rs").unwrap();
        let obs = Scope::parse("patient/Observation.rs").unwrap();
        let obs_read = Scope::parse("patient/Observation.r").unwrap();
        let sys_obs = Scope::parse("system/Observation.rs").unwrap();
        assert!(obs.covered_by(&all));
        assert!(obs_read.covered_by(&obs));
        assert!(!obs.covered_by(&obs_read));
        assert!(!sys_obs.covered_by(&all));
        assert!(!all.covered_by(&obs));
        assert!(Scope::OfflineAccess.covered_by_any(&[obs.clone(), Scope::OfflineAccess]));
        assert!(!Scope::OfflineAccess.covered_by_any(&[obs]));
    }

    #[test]
    fn the_checkup_upload_scope_is_a_system_scope_that_reads_nothing() {
        let upload = Scope::parse("system/DocumentReference.c").unwrap();
        assert_eq!(upload, Scope::CheckupUpload);
        assert_eq!(upload.to_string(), "system/DocumentReference.c");
        assert!(upload.is_system());
        assert!(!upload.is_patient_resource());
        assert!(upload.categories().is_empty());
        let read_all = Scope::parse("system/*.rs").unwrap();
        assert!(!upload.covered_by(&read_all));
        assert!(!read_all.covered_by(&upload));
        assert!(supported_resource_scopes(Context::System).contains(&upload.to_string()));
        assert!(!supported_resource_scopes(Context::Patient).contains(&upload.to_string()));
    }

    #[test]
    fn categories_follow_resource_types() {
        let scopes =
            parse_scopes("patient/Observation.rs patient/DiagnosticReport.rs launch/patient")
                .unwrap();
        assert_eq!(categories_of(&scopes), vec![DataCategory::Observations]);
        assert_eq!(
            categories_of(&parse_scopes("patient/*.rs").unwrap()).len(),
            DataCategory::ALL.len()
        );
    }
}
