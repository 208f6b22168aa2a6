//! The agent's modules are layered as `src/lib.rs` lists them: each module imports only
//! itself and modules listed below it (so the engine never reaches into the sockets that
//! front it, and nothing reaches into the daemon that wires everything). Read from the
//! sources, so a new upward import fails here before it tangles the tree.
#![allow(clippy::unwrap_used)]

use std::path::Path;

/// Top to bottom, as in `src/lib.rs`.
const LAYERS: &[&str] = &[
    "commands",
    "daemon",
    "sockets",
    "access",
    "engine",
    "update",
    "enroll",
    "validation",
    "stores",
    "alerts",
    "metrics",
    "audit",
    "net",
    "platform",
    "config",
];

fn rank(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|m| *m == module)
        .unwrap_or_else(|| panic!("module `{module}` is not in LAYERS (add it where it belongs)"))
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `text` names through `crate::`.
fn imported(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    let mut sorted = declared.clone();
    sorted.sort_by_key(|m| rank(m));
    assert_eq!(
        declared, sorted,
        "src/lib.rs declares the modules in layer order"
    );
    assert_eq!(
        declared.len(),
        LAYERS.len(),
        "every layer is a module of src/lib.rs"
    );

    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let mut parts = relative.iter().map(|p| p.to_string_lossy().to_string());
        let first = parts.next().unwrap();
        if first == "lib.rs" || first == "bin" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(file).unwrap();
        for target in imported(&text) {
            if rank(&target) < rank(&module) {
                violations.push(format!("{} imports crate::{target}", relative.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "upward imports:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_and_plain_imports() {
    assert_eq!(
        imported("use crate::{engine::Engine, sockets};\nlet x = crate::config::X;"),
        ["engine", "sockets", "config"]
    );
}
