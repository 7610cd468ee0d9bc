//! The direction of dependencies between the parts of `src/` (the table in `src/lib.rs`): a part
//! may import only the parts listed for it. Reads every `crate::<part>` path in the code (comments
//! and doc text excluded) and fails with the file, line and rule broken.

use std::fs;
use std::path::{Path, PathBuf};

/// Each part and the parts it may import. Listed top (entry) to bottom (platform).
const ALLOWED: &[(&str, &[&str])] = &[
    ("entry", &["*"]),
    (
        "backup",
        &["nexus", "client", "store", "protocol", "crypto", "platform"],
    ),
    (
        "migrate",
        &[
            "nexus",
            "client",
            "store",
            "transport",
            "identity",
            "protocol",
            "crypto",
            "platform",
        ],
    ),
    (
        "nexus",
        &[
            "client",
            "store",
            "transport",
            "identity",
            "protocol",
            "crypto",
            "platform",
        ],
    ),
    (
        "keeper",
        &["transport", "identity", "protocol", "crypto", "platform"],
    ),
    (
        "client",
        &["transport", "identity", "protocol", "crypto", "platform"],
    ),
    ("store", &["protocol", "crypto", "platform"]),
    ("transport", &["identity", "protocol", "platform"]),
    ("identity", &["protocol", "platform"]),
    ("protocol", &["crypto", "platform"]),
    ("crypto", &["platform"]),
    ("platform", &[]),
];

/// Files of the crate root that belong to no part: the library root, the executable's `main`
/// (an entry point) and the fuzzing entry points (behind the `fuzzing` feature).
const ROOT_FILES: &[&str] = &["lib.rs", "main.rs", "fuzzing.rs"];

fn part_of(rel: &Path) -> Option<&str> {
    let mut parts = rel.components();
    let first = parts.next()?.as_os_str().to_str()?;
    parts.next()?;
    Some(first)
}

/// One line with comments and string literals blanked out.
fn code_only(line: &str) -> String {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") || trimmed.starts_with("#[doc") {
        return String::new();
    }
    let mut out = String::new();
    let mut in_str = false;
    let mut prev = ' ';
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if !in_str && c == '/' && chars.peek() == Some(&'/') {
            break;
        }
        if c == '"' && prev != '\\' {
            in_str = !in_str;
        }
        out.push(if in_str { ' ' } else { c });
        prev = c;
    }
    out
}

/// The parts named by `crate::` paths in code: `crate::store::X` gives `store`, and a grouped
/// `crate::{nexus::A, store}` (on one line or several) gives `nexus` and `store`. Returns
/// (line number, part) pairs.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<String> = text.lines().map(code_only).collect();
    let code = lines.join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(found) = code[from..].find("crate::") {
        let at = from + found;
        from = at + 7;
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        let rest = &code[at + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if depth == 1 && item_start => {
                        item_start = false;
                        let name = ident(&group[i..]);
                        if !name.is_empty() && name != "self" {
                            out.push((line, name));
                        }
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.push((line, name));
            }
        }
    }
    out
}

/// Every import against the direction in one file's text, as messages.
fn violations(part: &str, file: &str, text: &str) -> Vec<String> {
    let Some((_, allowed)) = ALLOWED.iter().find(|(p, _)| *p == part) else {
        return vec![format!(
            "{file}: part {part:?} is not in the table of tests/layers.rs (and src/lib.rs)"
        )];
    };
    let mut out = Vec::new();
    for (line, used) in crate_paths(text) {
        let known = ALLOWED.iter().any(|(p, _)| *p == used);
        if used == part || !known || allowed.contains(&"*") || allowed.contains(&used.as_str()) {
            continue;
        }
        out.push(format!(
            "{file}:{line}: {part} imports crate::{used}, which it may not (allowed: {})",
            allowed.join(", ")
        ));
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_part_imports_only_the_parts_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut checked = 0;
    let mut errors = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).expect("under src");
        let Some(part) = part_of(rel) else {
            let name = rel.to_str().unwrap_or_default();
            assert!(
                ROOT_FILES.contains(&name),
                "src/{name} belongs to no part: put it in the folder of the part it serves"
            );
            continue;
        };
        let text = fs::read_to_string(path).expect("read source");
        errors.extend(violations(part, &format!("src/{}", rel.display()), &text));
        checked += 1;
    }
    assert!(checked > 30, "only {checked} files found under src/");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_checker_catches_what_it_should() {
    let bad = "use crate::store::Store;\nfn f() { crate::nexus::run(); }\n";
    assert_eq!(violations("crypto", "x.rs", bad).len(), 2);
    assert_eq!(violations("keeper", "x.rs", bad).len(), 2);
    assert_eq!(
        violations("identity", "x.rs", "let n = crate::nexus::X;").len(),
        1
    );
    let grouped = "use crate::{\n    nexus::A,\n    protocol::B,\n    store,\n};";
    assert_eq!(violations("client", "x.rs", grouped).len(), 2);
    // Allowed, or not code: comments, doc text, strings, other crates' paths.
    let fine = "//! see [`crate::nexus`]\n/// [`crate::store`]\nlet s = \"crate::nexus\";\n\
                use my_crate::nexus; // crate::store\n";
    assert!(violations("crypto", "x.rs", fine).is_empty());
    assert!(violations("nexus", "x.rs", "use crate::store::Store;").is_empty());
    assert!(violations("entry", "x.rs", "use crate::nexus::run;").is_empty());
}
