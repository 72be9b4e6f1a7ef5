//! The FHIR API's pure parts: search parameters, matching a stored resource against them,
//! and how a stored resource is served (as a tree, or as a line straight from its bytes). The HTTP side is in `http::fhir`.

pub mod matching;
pub mod present;
pub mod query;
pub mod serve;
pub mod stored_json;
