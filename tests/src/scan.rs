//! Scanning a directory's bytes for strings that must not be there (names,
//! addresses, identifiers, plaintext). Shared with broker/tests/cli.rs by path.

use std::path::{Path, PathBuf};

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// The (file, needle) pairs where a needle occurs in a file under `dir`, as raw bytes
/// and case-insensitively for ASCII.
pub fn scan_for(dir: &Path, needles: &[String]) -> Vec<(PathBuf, String)> {
    let needles: Vec<(String, Vec<u8>)> = needles
        .iter()
        .filter(|n| n.len() >= 4)
        .map(|n| (n.clone(), n.to_ascii_lowercase().into_bytes()))
        .collect();
    let mut hits = Vec::new();
    for file in files_under(dir) {
        let bytes = std::fs::read(&file)
            .expect("readable file")
            .to_ascii_lowercase();
        for (n, lower) in &needles {
            if bytes.windows(lower.len()).any(|w| w == lower.as_slice()) {
                hits.push((file.clone(), n.clone()));
            }
        }
    }
    hits
}

/// The (file, label) pairs where a needle occurs byte for byte in a file under `dir`.
pub fn scan_bytes(dir: &Path, needles: &[(String, Vec<u8>)]) -> Vec<(PathBuf, String)> {
    let mut hits = Vec::new();
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).expect("readable file");
        for (label, needle) in needles {
            if !needle.is_empty() && bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                hits.push((file.clone(), label.clone()));
            }
        }
    }
    hits
}
