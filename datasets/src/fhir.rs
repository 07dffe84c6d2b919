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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use crate::canonical::{self, ParseError};
use crate::categorize::{is_r4_resource_type, research_category_of_type};
use crate::deidentify::DeidConfig;
use crate::record::PatientRecord;
use crate::resolve::ResourceIndex;
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
}

impl ImportReport {
    fn absorb(&mut self, other: ImportReport) {
        self.patients.extend(other.patients);
        self.errors.extend(other.errors);
        self.files += other.files;
        self.resources += other.resources;
        self.skipped_files.extend(other.skipped_files);
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
    let mut report = ImportReport::default();
    let mut json_files = Vec::new();
    let mut ndjson_files = Vec::new();
    match fs::metadata(path) {
        Err(e) => {
            report
                .errors
                .push(file_error(path, None, format!("cannot read: {e}")));
            return report;
        }
        Ok(m) if m.is_dir() => {
            let mut files = Vec::new();
            collect_files(path, 0, &mut files, &mut report);
            for f in files {
                match kind_of(&f) {
                    Some(FileKind::Json) => json_files.push(f),
                    Some(FileKind::Ndjson) => ndjson_files.push(f),
                    None => report
                        .skipped_files
                        .push((f, "not a .json, .ndjson or .jsonl file".to_string())),
                }
            }
        }
        Ok(_) => match kind_of(path) {
            Some(FileKind::Ndjson) => ndjson_files.push(path.to_path_buf()),
            _ => json_files.push(path.to_path_buf()),
        },
    }

    // JSON files are independent: import them in parallel, merge in order.
    let parts: Vec<ImportReport> = json_files
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

    if !ndjson_files.is_empty() {
        let mut pool = Pool::default();
        for f in &ndjson_files {
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
            for f in &ndjson_files {
                report
                    .skipped_files
                    .push((f.clone(), origin_note.to_string()));
            }
        });
    }
    report
}

/// Imports one JSON document (a Bundle or a single resource) held in memory; `origin`
/// names it in errors.
pub fn import_bundle_json(bytes: &[u8], origin: &Path, cfg: &DeidConfig) -> ImportReport {
    let mut report = ImportReport::default();
    let doc: Value = match canonical::parse(bytes) {
        Ok(v) => v,
        Err(ParseError::Json(e)) => {
            report.errors.push(ImportError {
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
            });
            return report;
        }
        Err(ParseError::Utf8 { offset }) => {
            report.errors.push(file_error(
                origin,
                None,
                format!("not UTF-8 (byte {offset})"),
            ));
            return report;
        }
    };
    let mut pool = Pool::default();
    let file = pool.add_file(origin);
    if util::resource_type(&doc) == Some("Bundle") {
        match doc.get("entry") {
            None => {}
            Some(Value::Array(entries)) => {
                for (i, entry) in entries.iter().enumerate() {
                    if entry
                        .get("request")
                        .and_then(|r| r.get("method"))
                        .and_then(Value::as_str)
                        == Some("DELETE")
                    {
                        continue;
                    }
                    let at = At {
                        line: None,
                        entry: Some(i),
                    };
                    match entry.get("resource") {
                        Some(resource) => {
                            report.resources += 1;
                            let full_url = entry.get("fullUrl").and_then(Value::as_str);
                            pool.add(resource.clone(), full_url, file, at, &mut report);
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
            }
            Some(_) => report.errors.push(file_error(
                origin,
                None,
                "Bundle.entry is not an array".into(),
            )),
        }
    } else {
        report.resources += 1;
        pool.add(doc, None, file, At::default(), &mut report);
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

/// A resource waiting to be grouped, with where it came from.
struct Item {
    resource: Value,
    file: usize,
    at: At,
}

/// Resources read so far, waiting to be grouped by patient.
#[derive(Default)]
struct Pool {
    files: Vec<PathBuf>,
    patients: Vec<Item>,
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
        ImportError {
            file: self.files.get(item_file).cloned().unwrap_or_default(),
            line: at.line,
            entry: at.entry,
            resource_type: util::resource_type(resource).map(|t| util::clip(t, 64)),
            resource_id: util::resource_id(resource).map(|i| util::clip(i, 64)),
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
            self.patients.push(Item { resource, file, at });
            return;
        }
        if let Some(reason) = reason {
            report.errors.push(self.error(file, at, &resource, reason));
            return;
        }
        if ty == "Medication" {
            self.shared.push(resource);
        } else if research_category_of_type(&ty).is_some() {
            self.clinical.push(Item { resource, file, at });
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
    pool: Pool,
    cfg: &DeidConfig,
    report: &mut ImportReport,
    no_patient: impl FnOnce(&mut ImportReport),
) {
    if pool.patients.is_empty() {
        no_patient(report);
        return;
    }
    // Patient id → position; duplicates are reported and ignored.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut patients: Vec<&Item> = Vec::new();
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

    let mut groups: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    for item in &pool.clinical {
        let target = match util::patient_reference(&item.resource) {
            None => Err("has no subject or patient reference"),
            Some(r) => util::patient_id_of_reference(r)
                .and_then(|id| by_id.get(id).copied())
                .ok_or("subject or patient reference does not match any Patient in the input"),
        };
        match target {
            Ok(p) => groups.entry(p).or_default().push(item.resource.clone()),
            Err(reason) => {
                report
                    .errors
                    .push(pool.error(item.file, item.at, &item.resource, reason.into()))
            }
        }
    }

    let shared = ResourceIndex::new(&pool.shared);
    let mut aliases: Vec<Vec<String>> = vec![Vec::new(); patients.len()];
    for (uuid, id) in &pool.patient_aliases {
        if let Some(p) = by_id.get(id).copied() {
            aliases[p].push(uuid.clone());
        }
    }
    let jobs: Vec<(usize, Vec<Value>)> = (0..patients.len())
        .map(|p| (p, groups.remove(&p).unwrap_or_default()))
        .collect();
    let records: Vec<PatientRecord> = jobs
        .into_par_iter()
        .map(|(p, resources)| {
            PatientRecord::build(
                &patients[p].resource,
                &resources,
                Some(&shared),
                &aliases[p],
                cfg,
            )
        })
        .collect();
    report.patients.extend(records);
}
