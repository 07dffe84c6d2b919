//! FHIR R4 importer: Bundles (`.json`) and bulk-data NDJSON (`.ndjson`).
//!
//! * A `.json` file holds one Bundle (transaction, batch or collection; Synthea writes one
//!   per patient) or one bare resource. Each JSON file is self-contained: its resources are
//!   grouped by the patient they reference among the Patients of the same file. A Bundle
//!   without any Patient (Synthea's `hospitalInformation*.json` and
//!   `practitionerInformation*.json`) is skipped with a note in
//!   [`ImportReport::skipped_files`], not an error.
//! * `.ndjson` (or `.jsonl`) files hold one resource per line, read line by line; all NDJSON
//!   files of an import are pooled, so that `Patient.ndjson`, `Condition.ndjson`, … (possibly
//!   split over several files) are joined by patient reference.
//!
//! Memory stays close to the size of the input: a Bundle's entries are parsed one at a time
//! (its members may come in any order), each resource is kept as compact JSON text until
//! its patient is assembled, and a patient's resources are then parsed again one at a time
//! while the research copy is written; only the resources that another one refers to for
//! its category (reasons, addressed conditions) or code (Medication) are held parsed. A
//! 50 MiB single-patient Bundle peaks at 3.5 MiB of client memory per MiB of input,
//! sealing included, where parsing it whole takes 8.4 (`bundle-bench`, benches/RESULTS.md).
//!
//! References to the patient may be `urn:uuid:<id>` (Synthea) or `Patient/<id>` (any base
//! URL, optional `_history`). A directory is walked recursively in sorted order, so an
//! import is deterministic; hidden entries (`.…`) are ignored.
//!
//! Bad input never aborts an import and never loses more than the bad part: an unreadable or
//! unparsable file gives one [`ImportError`] (with serde_json's line and column) and the
//! other files import; a malformed resource (not an object, no `resourceType`, a Condition
//! without a code, a date that is not a date, a quantity whose value is not a number, a
//! subject that names no known Patient, …) gives one error naming the file, line (NDJSON),
//! resource type and id (and, in a Bundle, the entry's index), and the rest of its patient
//! still imports. A Patient with a bad element still imports without that element. Errors
//! name elements, never their values.
//!
//! Nothing is left out silently: resources of FHIR R4 types outside the research copy
//! (Organization, Claim, …) are counted per type in [`ImportReport::not_imported`];
//! resources whose `resourceType` is not a FHIR R4 type are counted per file and type in
//! [`ImportReport::unknown_types`]; skipped files are named with the reason in
//! [`ImportReport::skipped_files`] (`brokerctl` prints all three).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use crate::canonical::{self, ParseError};
use crate::categorize::{is_r4_resource_type, known_type_name, research_category_of_type};
use crate::deidentify::DeidConfig;
use crate::index::Withheld;
use crate::record::PatientRecord;
use crate::resolve::{Resolver, ResourceIndex};
use crate::util::{self, RefTarget};
use crate::validate;

/// The result of an import.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// One record per imported Patient, in input order.
    pub patients: Vec<PatientRecord>,
    /// Everything that could not be imported.
    pub errors: Vec<ImportError>,
    /// Number of `.json`/`.ndjson` files read (including those that failed).
    pub files: usize,
    /// Number of resources read (of every type, including those not part of the research
    /// copy and those rejected).
    pub resources: usize,
    /// Files not imported, with the reason (no Patient in a Bundle, not a JSON file).
    pub skipped_files: Vec<(PathBuf, String)>,
    /// Resources of FHIR R4 types that are not part of the research copy (Organization,
    /// Practitioner, Claim, Provenance, …), counted per type: read, and left out.
    pub not_imported: BTreeMap<String, usize>,
    /// Resources whose `resourceType` is not a FHIR R4 resource type, counted per file and
    /// per type (as written, at most 64 characters): left out.
    pub unknown_types: BTreeMap<PathBuf, BTreeMap<String, usize>>,
    /// Index rows of the imported patients withheld under Safe Harbor.
    pub withheld: Withheld,
}

impl ImportReport {
    /// Adds `other` (a later part of the same import) to this report.
    pub fn absorb(&mut self, other: ImportReport) {
        self.patients.extend(other.patients);
        self.errors.extend(other.errors);
        self.files += other.files;
        self.resources += other.resources;
        self.skipped_files.extend(other.skipped_files);
        self.withheld.add(&other.withheld);
        for (ty, n) in other.not_imported {
            *self.not_imported.entry(ty).or_default() += n;
        }
        for (file, types) in other.unknown_types {
            let counts = self.unknown_types.entry(file).or_default();
            for (ty, n) in types {
                *counts.entry(ty).or_default() += n;
            }
        }
    }
}

/// Something in the input that could not be imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line: of the NDJSON record, or of a JSON syntax error.
    pub line: Option<usize>,
    /// 0-based index of the Bundle entry in error, for a resource of a Bundle.
    pub entry: Option<usize>,
    /// The type of the resource in error, when known.
    pub resource_type: Option<String>,
    /// The id of the resource in error, when known.
    pub resource_id: Option<String>,
    /// What is wrong. Names elements, never patient data.
    pub reason: String,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(entry) = self.entry {
            write!(f, ": Bundle.entry[{entry}]")?;
        }
        match (&self.resource_type, &self.resource_id) {
            (Some(t), Some(id)) => write!(f, ": {t}/{id}")?,
            (Some(t), None) => write!(f, ": {t}")?,
            (None, Some(id)) => write!(f, ": (id {id})")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ImportError {}

/// Imports a file or a directory (recursively, in sorted order). `.ndjson`/`.jsonl` files
/// are read as NDJSON; in a directory, other files than `.json`, `.ndjson` and `.jsonl`
/// are noted in [`ImportReport::skipped_files`]; a single file of another extension is read
/// as JSON.
pub fn import_path(path: &Path, cfg: &DeidConfig) -> ImportReport {
    let ImportFiles {
        json,
        ndjson,
        mut report,
    } = ImportFiles::find(path);
    report.absorb(import_json_files(&json, cfg));
    report.absorb(import_ndjson_files(&ndjson, cfg));
    report
}

/// The files an import of a path reads, found as [`import_path`] finds them, so that a
/// caller can import the JSON files a few at a time and hold only those patients at once.
#[derive(Debug, Default)]
pub struct ImportFiles {
    /// `.json` files (each self-contained), in order.
    pub json: Vec<PathBuf>,
    /// `.ndjson`/`.jsonl` files, imported together (their resources join by patient).
    pub ndjson: Vec<PathBuf>,
    /// What finding them met: unreadable paths, skipped files.
    pub report: ImportReport,
}

impl ImportFiles {
    /// The files under `path` (a file, or a directory walked recursively in sorted order).
    pub fn find(path: &Path) -> ImportFiles {
        let mut found = ImportFiles::default();
        match fs::metadata(path) {
            Err(e) => found
                .report
                .errors
                .push(file_error(path, None, format!("cannot read: {e}"))),
            Ok(m) if m.is_dir() => {
                let mut files = Vec::new();
                collect_files(path, 0, &mut files, &mut found.report);
                for f in files {
                    match kind_of(&f) {
                        Some(FileKind::Json) => found.json.push(f),
                        Some(FileKind::Ndjson) => found.ndjson.push(f),
                        None => found
                            .report
                            .skipped_files
                            .push((f, "not a .json, .ndjson or .jsonl file".to_string())),
                    }
                }
            }
            Ok(_) => match kind_of(path) {
                Some(FileKind::Ndjson) => found.ndjson.push(path.to_path_buf()),
                _ => found.json.push(path.to_path_buf()),
            },
        }
        found
    }
}

/// Imports `.json` files: each is independent, so they are read in parallel and merged
/// in order.
pub fn import_json_files(files: &[PathBuf], cfg: &DeidConfig) -> ImportReport {
    let mut report = ImportReport::default();
    let parts: Vec<ImportReport> = files
        .par_iter()
        .map(|f| {
            let mut part = match fs::read(f) {
                Ok(bytes) => import_bundle_json(&bytes, f, cfg),
                Err(e) => {
                    let mut r = ImportReport::default();
                    r.errors
                        .push(file_error(f, None, format!("cannot read: {e}")));
                    r
                }
            };
            part.files = 1;
            part
        })
        .collect();
    for part in parts {
        report.absorb(part);
    }
    report
}

/// Imports NDJSON files together: their resources are pooled and joined by patient.
pub fn import_ndjson_files(files: &[PathBuf], cfg: &DeidConfig) -> ImportReport {
    let mut report = ImportReport::default();
    if files.is_empty() {
        return report;
    }
    let mut pool = Pool::default();
    for f in files {
        report.files += 1;
        match fs::File::open(f) {
            Ok(file) => read_ndjson(BufReader::new(file), f, &mut pool, &mut report),
            Err(e) => report
                .errors
                .push(file_error(f, None, format!("cannot read: {e}"))),
        }
    }
    let origin_note = "no Patient resource in the NDJSON input";
    assemble(pool, cfg, &mut report, |report| {
        for f in files {
            report
                .skipped_files
                .push((f.clone(), origin_note.to_string()));
        }
    });
    report
}

/// Imports one JSON document (a Bundle or a single resource) held in memory; `origin`
/// names it in errors.
///
/// A Bundle's entries are parsed one at a time and each is kept as compact JSON text until
/// its patient is assembled, so the memory an import needs stays close to the size of the
/// input rather than to that of its parsed form (several times larger).
pub fn import_bundle_json(bytes: &[u8], origin: &Path, cfg: &DeidConfig) -> ImportReport {
    let mut report = ImportReport::default();
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            report.errors.push(file_error(
                origin,
                None,
                format!("not UTF-8 (byte {})", e.valid_up_to()),
            ));
            return report;
        }
    };
    let json_error = |e: serde_json::Error| ImportError {
        file: origin.to_path_buf(),
        line: Some(e.line()),
        entry: None,
        resource_type: None,
        resource_id: None,
        reason: format!(
            "invalid JSON at line {}, column {}: {}",
            e.line(),
            e.column(),
            json_message(&e)
        ),
    };
    let mut pool = Pool::default();
    let file = pool.add_file(origin);
    // An object is read with its `entry` array streamed into the pool, as a Bundle's
    // entries; should it turn out not to be a Bundle, it is read again whole.
    let mut streamed_report = ImportReport::default();
    let streamed = if text.trim_start().starts_with('{') {
        let mut on_entry = |i: usize, entry: Value| {
            add_entry(&mut pool, file, origin, i, entry, &mut streamed_report)
        };
        match stream_document(text, &mut on_entry) {
            Ok(doc) => Some(doc),
            Err(e) => {
                report.errors.push(json_error(e));
                return report;
            }
        }
    } else {
        None
    };
    match streamed {
        Some(doc) if doc.members.get("resourceType").and_then(Value::as_str) == Some("Bundle") => {
            report.absorb(streamed_report);
            if doc.entry == EntryShape::NotArray {
                report.errors.push(file_error(
                    origin,
                    None,
                    "Bundle.entry is not an array".into(),
                ));
            }
        }
        Some(doc) if doc.entry == EntryShape::Absent => {
            report.resources += 1;
            pool.add(
                Value::Object(doc.members),
                None,
                file,
                At::default(),
                &mut report,
            );
        }
        _ => {
            // Not an object, or a resource of another type with an `entry` member.
            let mut pool_whole = Pool::default();
            let file = pool_whole.add_file(origin);
            match canonical::parse(bytes) {
                Ok(doc) => {
                    report.resources += 1;
                    pool_whole.add(doc, None, file, At::default(), &mut report);
                }
                Err(ParseError::Json(e)) => {
                    report.errors.push(json_error(e));
                    return report;
                }
                Err(ParseError::Utf8 { .. }) => unreachable!("checked above"),
            }
            pool = pool_whole;
        }
    }
    let resources = report.resources;
    assemble(pool, cfg, &mut report, |report| {
        report.skipped_files.push((
            origin.to_path_buf(),
            format!("no Patient resource ({resources} resources)"),
        ));
    });
    report
}

/// Files Bundle entry `i` (its `resource`) in the pool, or reports why it cannot be.
fn add_entry(
    pool: &mut Pool,
    file: usize,
    origin: &Path,
    i: usize,
    mut entry: Value,
    report: &mut ImportReport,
) {
    if entry
        .get("request")
        .and_then(|r| r.get("method"))
        .and_then(Value::as_str)
        == Some("DELETE")
    {
        return;
    }
    let at = At {
        line: None,
        entry: Some(i),
    };
    let full_url = entry
        .get("fullUrl")
        .and_then(Value::as_str)
        .map(str::to_string);
    match entry.as_object_mut().and_then(|e| e.remove("resource")) {
        Some(resource) => {
            report.resources += 1;
            pool.add(resource, full_url.as_deref(), file, at, report);
        }
        None => report.errors.push(ImportError {
            file: origin.to_path_buf(),
            line: None,
            entry: Some(i),
            resource_type: None,
            resource_id: None,
            reason: if entry.is_object() {
                "the entry has no resource".into()
            } else {
                "the entry is not an object".into()
            },
        }),
    }
}

/// What a JSON object's `entry` member was, when read by [`stream_document`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryShape {
    Absent,
    Array,
    NotArray,
}

/// A JSON object read with its `entry` array streamed: the other members, and what
/// `entry` was.
struct StreamedDocument {
    members: serde_json::Map<String, Value>,
    entry: EntryShape,
}

/// Reads a JSON object, handing each element of its (first) `entry` array to `on_entry`
/// as soon as it is parsed, so that the array is never held whole.
fn stream_document(
    text: &str,
    on_entry: &mut dyn FnMut(usize, Value),
) -> Result<StreamedDocument, serde_json::Error> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_str(text);
    let doc = (&mut de).deserialize_map(DocumentVisitor { on_entry })?;
    de.end()?;
    Ok(doc)
}

struct DocumentVisitor<'f> {
    on_entry: &'f mut dyn FnMut(usize, Value),
}

impl<'de> serde::de::Visitor<'de> for DocumentVisitor<'_> {
    type Value = StreamedDocument;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = serde_json::Map::new();
        let mut entry = EntryShape::Absent;
        while let Some(key) = map.next_key::<String>()? {
            if key == "entry" && entry == EntryShape::Absent {
                entry = map.next_value_seed(EntrySeed {
                    on_entry: &mut *self.on_entry,
                })?;
            } else {
                let value: Value = map.next_value()?;
                members.insert(key, value);
            }
        }
        Ok(StreamedDocument { members, entry })
    }
}

/// The `entry` member: an array is streamed element by element; anything else is read
/// past and reported as [`EntryShape::NotArray`].
struct EntrySeed<'f> {
    on_entry: &'f mut dyn FnMut(usize, Value),
}

impl<'de> serde::de::DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = EntryShape;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<EntryShape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntrySeed<'_> {
    type Value = EntryShape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bundle.entry")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<EntryShape, A::Error> {
        let mut i = 0;
        while let Some(entry) = seq.next_element::<Value>()? {
            (self.on_entry)(i, entry);
            i += 1;
        }
        Ok(EntryShape::Array)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<EntryShape, A::Error> {
        use serde::de::IgnoredAny;
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(EntryShape::NotArray)
    }

    fn visit_bool<E>(self, _: bool) -> Result<EntryShape, E> {
        Ok(EntryShape::NotArray)
    }

    fn visit_i64<E>(self, _: i64) -> Result<EntryShape, E> {
        Ok(EntryShape::NotArray)
    }

    fn visit_u64<E>(self, _: u64) -> Result<EntryShape, E> {
        Ok(EntryShape::NotArray)
    }

    fn visit_f64<E>(self, _: f64) -> Result<EntryShape, E> {
        Ok(EntryShape::NotArray)
    }

    fn visit_str<E>(self, _: &str) -> Result<EntryShape, E> {
        Ok(EntryShape::NotArray)
    }

    fn visit_unit<E>(self) -> Result<EntryShape, E> {
        Ok(EntryShape::NotArray)
    }
}

/// Imports NDJSON held in memory (one resource per line); `origin` names it in errors.
pub fn import_ndjson_bytes(bytes: &[u8], origin: &Path, cfg: &DeidConfig) -> ImportReport {
    let mut report = ImportReport::default();
    let mut pool = Pool::default();
    read_ndjson(bytes, origin, &mut pool, &mut report);
    assemble(pool, cfg, &mut report, |report| {
        report.skipped_files.push((
            origin.to_path_buf(),
            "no Patient resource in the NDJSON input".to_string(),
        ));
    });
    report
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Json,
    Ndjson,
}

fn kind_of(path: &Path) -> Option<FileKind> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "json" => Some(FileKind::Json),
        "ndjson" | "jsonl" => Some(FileKind::Ndjson),
        _ => None,
    }
}

const MAX_DEPTH: usize = 32;

fn collect_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>, report: &mut ImportReport) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            report
                .errors
                .push(file_error(dir, None, format!("cannot read directory: {e}")));
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    paths.sort();
    for p in paths {
        match fs::metadata(&p) {
            Ok(m) if m.is_dir() => {
                if depth < MAX_DEPTH {
                    collect_files(&p, depth + 1, out, report);
                }
            }
            Ok(_) => out.push(p),
            Err(e) => report
                .errors
                .push(file_error(&p, None, format!("cannot read: {e}"))),
        }
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn file_error(file: &Path, line: Option<usize>, reason: String) -> ImportError {
    ImportError {
        file: file.to_path_buf(),
        line,
        entry: None,
        resource_type: None,
        resource_id: None,
        reason,
    }
}

fn read_ndjson<R: BufRead>(
    mut reader: R,
    origin: &Path,
    pool: &mut Pool,
    report: &mut ImportReport,
) {
    let file = pool.add_file(origin);
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                report.errors.push(file_error(
                    origin,
                    Some(line_no + 1),
                    format!("cannot read: {e}"),
                ));
                break;
            }
        }
        line_no += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        report.resources += 1;
        match canonical::parse(&buf) {
            Ok(v) => pool.add(
                v,
                None,
                file,
                At {
                    line: Some(line_no),
                    entry: None,
                },
                report,
            ),
            Err(ParseError::Json(e)) => report.errors.push(file_error(
                origin,
                Some(line_no),
                format!(
                    "invalid JSON at column {}: {}",
                    e.column(),
                    json_message(&e)
                ),
            )),
            Err(ParseError::Utf8 { offset }) => report.errors.push(file_error(
                origin,
                Some(line_no),
                format!("not UTF-8 (byte {offset} of the line)"),
            )),
        }
    }
}

/// Where a resource is in its file: the NDJSON line, or the Bundle entry.
#[derive(Debug, Clone, Copy, Default)]
struct At {
    line: Option<usize>,
    entry: Option<usize>,
}

/// A Patient waiting for its resources, with where it came from.
struct PatientItem {
    resource: Value,
    file: usize,
    at: At,
}

/// A resource waiting to be grouped by patient. It is kept as compact JSON text (its
/// parsed form takes several times the memory) with what grouping and reference
/// resolution need to know without parsing it again.
struct Item {
    json: Box<str>,
    resource_type: String,
    id: Option<String>,
    /// The `subject` or `patient` reference.
    patient_reference: Option<String>,
    /// The ids its reasons, addressed conditions and medication refer to: the resources a
    /// research copy needs whole to categorize or complete this one.
    needs: Vec<String>,
    file: usize,
    at: At,
}

impl Item {
    fn new(resource: &Value, file: usize, at: At) -> Item {
        let mut needs = Vec::new();
        let references = ["reasonReference", "addresses"]
            .iter()
            .filter_map(|k| resource.get(*k)?.as_array())
            .flatten()
            .chain(resource.get("medicationReference"))
            .filter_map(|r| r.get("reference")?.as_str());
        for r in references {
            if let RefTarget::Uuid(id) | RefTarget::Typed(_, id) = util::parse_reference(r) {
                needs.push(id.to_string());
            }
        }
        Item {
            json: resource.to_string().into_boxed_str(),
            resource_type: util::resource_type(resource)
                .unwrap_or_default()
                .to_string(),
            id: util::resource_id(resource).map(str::to_string),
            patient_reference: util::patient_reference(resource).map(str::to_string),
            needs,
            file,
            at,
        }
    }

    /// The resource, parsed again (it parsed once already, so only memory can fail).
    fn parse(&self) -> Option<Value> {
        self.json.parse().ok()
    }
}

/// Resources read so far, waiting to be grouped by patient.
#[derive(Default)]
struct Pool {
    files: Vec<PathBuf>,
    patients: Vec<PatientItem>,
    /// Resources of the research-copy types, which must reference a Patient.
    clinical: Vec<Item>,
    /// Shared resources that clinical ones may reference (Medication).
    shared: Vec<Value>,
    /// `urn:uuid:` fullUrls of Patients whose id differs: (uuid, id).
    patient_aliases: Vec<(String, String)>,
}

impl Pool {
    fn add_file(&mut self, path: &Path) -> usize {
        self.files.push(path.to_path_buf());
        self.files.len() - 1
    }

    fn error(&self, item_file: usize, at: At, resource: &Value, reason: String) -> ImportError {
        self.error_named(
            item_file,
            at,
            util::resource_type(resource),
            util::resource_id(resource),
            reason,
        )
    }

    fn error_named(
        &self,
        item_file: usize,
        at: At,
        resource_type: Option<&str>,
        resource_id: Option<&str>,
        reason: String,
    ) -> ImportError {
        ImportError {
            file: self.files.get(item_file).cloned().unwrap_or_default(),
            line: at.line,
            entry: at.entry,
            resource_type: resource_type.map(|t| util::clip(t, 64)),
            resource_id: resource_id.map(|i| util::clip(i, 64)),
            reason,
        }
    }

    /// Checks a resource and files it; reports and drops it when it is malformed.
    fn add(
        &mut self,
        mut resource: Value,
        full_url: Option<&str>,
        file: usize,
        at: At,
        report: &mut ImportReport,
    ) {
        if let Err(p) = validate::check_envelope(&resource) {
            report
                .errors
                .push(self.error(file, at, &resource, p.reason));
            return;
        }
        // Transaction bundles may carry the id in fullUrl only.
        let uuid = match full_url.map(util::parse_reference) {
            Some(RefTarget::Uuid(id)) => Some(id.to_string()),
            _ => None,
        };
        if util::resource_id(&resource).is_none()
            && let Some(id) = &uuid
            && let Some(obj) = resource.as_object_mut()
        {
            obj.insert("id".into(), Value::String(id.clone()));
        }
        let ty = util::resource_type(&resource)
            .unwrap_or_default()
            .to_string();
        let problems = validate::check_content(&resource);
        let reason = (!problems.is_empty()).then(|| {
            problems
                .iter()
                .map(|p| p.reason.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        });
        if ty == "Patient" {
            // Keep the patient, without the offending elements.
            if let Some(reason) = reason {
                report.errors.push(self.error(file, at, &resource, reason));
                if let Some(obj) = resource.as_object_mut() {
                    for p in &problems {
                        if let Some(el) = &p.element {
                            obj.remove(el);
                        }
                    }
                }
            }
            let Some(id) = util::resource_id(&resource) else {
                report
                    .errors
                    .push(self.error(file, at, &resource, "Patient has no id".into()));
                return;
            };
            // References may use the entry's `urn:uuid:` fullUrl rather than the id.
            if let Some(uuid) = uuid
                && uuid != id
            {
                self.patient_aliases.push((uuid, id.to_string()));
            }
            self.patients.push(PatientItem { resource, file, at });
            return;
        }
        if let Some(reason) = reason {
            report.errors.push(self.error(file, at, &resource, reason));
            return;
        }
        if ty == "Medication" {
            self.shared.push(resource);
        } else if research_category_of_type(&ty).is_some() {
            self.clinical.push(Item::new(&resource, file, at));
        } else if is_r4_resource_type(&ty) {
            // Providers, billing, provenance, …: read, and left out.
            *report.not_imported.entry(ty).or_default() += 1;
        } else {
            let path = self.files.get(file).cloned().unwrap_or_default();
            let counts = report.unknown_types.entry(path).or_default();
            *counts.entry(util::clip(&ty, 64)).or_default() += 1;
        }
    }
}

/// Groups the pooled resources by patient and builds the records. `no_patient` is called
/// instead when the pool holds no Patient at all.
fn assemble(
    mut pool: Pool,
    cfg: &DeidConfig,
    report: &mut ImportReport,
    no_patient: impl FnOnce(&mut ImportReport),
) {
    if pool.patients.is_empty() {
        no_patient(report);
        return;
    }
    let clinical = std::mem::take(&mut pool.clinical);
    // Patient id → position; duplicates are reported and ignored.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut patients: Vec<&PatientItem> = Vec::new();
    for item in &pool.patients {
        let id = util::resource_id(&item.resource)
            .unwrap_or_default()
            .to_string();
        if by_id.contains_key(&id) {
            report.errors.push(pool.error(
                item.file,
                item.at,
                &item.resource,
                "duplicate Patient id; the first one was imported".into(),
            ));
            continue;
        }
        by_id.insert(id, patients.len());
        patients.push(item);
    }
    for (uuid, id) in &pool.patient_aliases {
        if let Some(p) = by_id.get(id).copied() {
            by_id.entry(uuid.clone()).or_insert(p);
        }
    }

    let mut groups: BTreeMap<usize, Vec<Item>> = BTreeMap::new();
    for item in clinical {
        let target = match &item.patient_reference {
            None => Err("has no subject or patient reference"),
            Some(r) => util::patient_id_of_reference(r)
                .and_then(|id| by_id.get(id).copied())
                .ok_or("subject or patient reference does not match any Patient in the input"),
        };
        match target {
            Ok(p) => groups.entry(p).or_default().push(item),
            Err(reason) => report.errors.push(pool.error_named(
                item.file,
                item.at,
                Some(&item.resource_type),
                item.id.as_deref(),
                reason.into(),
            )),
        }
    }

    let shared = ResourceIndex::new(&pool.shared);
    let mut aliases: Vec<Vec<String>> = vec![Vec::new(); patients.len()];
    for (uuid, id) in &pool.patient_aliases {
        if let Some(p) = by_id.get(id).copied() {
            aliases[p].push(uuid.clone());
        }
    }
    let jobs: Vec<(usize, Vec<Item>)> = (0..patients.len())
        .map(|p| (p, groups.remove(&p).unwrap_or_default()))
        .collect();
    let records: Vec<PatientRecord> = jobs
        .into_par_iter()
        .map(|(p, items)| {
            let patient = &patients[p].resource;
            // Every resource's type by id, and whole only those another one needs.
            let mut types: HashMap<String, &'static str> = HashMap::new();
            let mut needed: HashSet<&str> = HashSet::new();
            for item in &items {
                if let (Some(id), Some(ty)) = (&item.id, known_type_name(&item.resource_type)) {
                    types.insert(id.clone(), ty);
                }
                needed.extend(item.needs.iter().map(String::as_str));
            }
            let whole: Vec<Value> = items
                .iter()
                .filter(|i| i.id.as_deref().is_some_and(|id| needed.contains(id)))
                .filter_map(Item::parse)
                .collect();
            let resolver = Resolver::new(patient, &whole, Some(&shared))
                .with_patient_aliases(&aliases[p])
                .with_types(&types);
            let resources = items.iter().filter_map(Item::parse).map(Cow::Owned);
            PatientRecord::build(patient, &resolver, resources, cfg, None)
        })
        .collect();
    for r in &records {
        report.withheld.add(&r.withheld);
    }
    report.patients.extend(records);
}
