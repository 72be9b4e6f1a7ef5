//! 特定健診 CDA conversion rate: parse + FHIR Bundle per document, without and with XSD
//! validation, on one thread (so the figure is per core).
//!
//! `cargo bench -p phr-adapters --bench cda` (PHR_BENCH_DOCS to change the count).

use std::hint::black_box;
use std::time::Instant;

use phr_adapters::tokutei_cda::{parse, to_fhir_bundle, validate, ItemTable, ValueType};

/// The test generator, built on the module's public API (it imports `super::{ItemTable,
/// ValueType}`).
#[allow(dead_code)]
#[path = "../src/tokutei_cda/generator.rs"]
mod generator;

use generator::{render, GenObservation, Header};

/// A document of typical size: the first 45 items of the table (a 特定健診 has 40–60).
fn typical_document() -> Vec<u8> {
    let observations: Vec<GenObservation> = ItemTable::get()
        .iter()
        .take(45)
        .enumerate()
        .map(|(n, d)| GenObservation::typical(d.code, n))
        .collect();
    render(&Header::default(), &observations)
}

fn rate(label: &str, docs: usize, xml: &[u8], with_xsd: bool) {
    let start = Instant::now();
    for _ in 0..docs {
        if with_xsd {
            if let Err(e) = validate(xml) {
                panic!("bench document fails the XSD: {e}");
            }
        }
        let doc = parse(xml).unwrap_or_else(|e| panic!("bench document does not parse: {e}"));
        let conversion = to_fhir_bundle(&doc, xml);
        assert!(conversion.item_errors.is_empty());
        black_box(conversion);
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{label:<32} {docs:>6} docs in {seconds:>7.3} s = {:>8.0} docs/s ({:.1} µs/doc)",
        docs as f64 / seconds,
        seconds * 1e6 / docs as f64
    );
}

fn main() {
    let docs: usize = std::env::var("PHR_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let xml = typical_document();
    println!("document: {} bytes, 45 results, one thread", xml.len());
    // Warm-up: item table, schema compile (per thread), caches.
    validate(&xml).unwrap_or_else(|e| panic!("bench document fails the XSD: {e}"));
    let schema_start = Instant::now();
    std::thread::spawn(move || validate(&typical_document()))
        .join()
        .ok();
    println!(
        "schema compile + first validation on a new thread: {:.0} ms",
        schema_start.elapsed().as_secs_f64() * 1e3
    );
    let start = Instant::now();
    for _ in 0..docs {
        black_box(parse(black_box(&xml)).ok());
    }
    let parse_seconds = start.elapsed().as_secs_f64();
    println!(
        "{:<32} {:>6.1} µs/doc",
        "  of which parse",
        parse_seconds * 1e6 / docs as f64
    );
    let parsed = parse(&xml).unwrap_or_else(|e| panic!("bench document does not parse: {e}"));
    let start = Instant::now();
    for _ in 0..docs {
        black_box(to_fhir_bundle(black_box(&parsed), b""));
    }
    let convert_seconds = start.elapsed().as_secs_f64();
    println!(
        "{:<32} {:>6.1} µs/doc",
        "  of which convert (no original)",
        convert_seconds * 1e6 / docs as f64
    );
    rate("parse + convert", docs, &xml, false);
    rate("validate (XSD) + parse + convert", docs / 5, &xml, true);
}
