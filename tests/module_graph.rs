//! No two top-level modules of `src/` import each other in a loop (docs/ARCHITECTURE.md).
//!
//! Reads the sources: a module's dependencies are the `crate::NAME` paths in its files, outside
//! comments and test modules. A loop means neither side can be read, tested or moved alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::NAME` paths in `text`, outside `//` comments and after no `#[cfg(test)]`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut deps = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                deps.insert(name);
            }
        }
    }
    deps
}

fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let deps = crate_paths(&std::fs::read_to_string(&f).unwrap());
        graph
            .entry(top.clone())
            .or_default()
            .extend(deps.into_iter().filter(|d| *d != top));
    }
    let names: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| names.contains(d));
    }
    graph
}

/// Every module that can reach itself through others.
fn in_loops(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for start in graph.keys() {
        // Depth-first from each dependency of `start`, looking for `start`.
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = graph[start]
            .iter()
            .map(|d| (d.clone(), vec![start.clone(), d.clone()]))
            .collect();
        while let Some((m, path)) = stack.pop() {
            if m == *start {
                found.push((start.clone(), path));
                break;
            }
            if !seen.insert(m.clone()) {
                continue;
            }
            for d in &graph[&m] {
                let mut p = path.clone();
                p.push(d.clone());
                stack.push((d.clone(), p));
            }
        }
    }
    found
}

#[test]
fn no_two_modules_import_each_other_in_a_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.contains_key("broker") && graph["broker"].contains("log"));
    let loops = in_loops(&graph);
    assert!(
        loops.is_empty(),
        "import loops among src/ modules:\n{}",
        loops
            .iter()
            .map(|(_, p)| p.join(" -> "))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn the_check_finds_a_loop() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    g.insert("d".into(), ["a".to_string()].into());
    let loops = in_loops(&g);
    assert_eq!(loops.len(), 3, "{loops:?}");
    assert!(loops.iter().all(|(m, _)| m != "d"));
    assert_eq!(
        crate_paths("use crate::log::x; // crate::broker\n#[cfg(test)]\nuse crate::sim;"),
        ["log".to_string()].into()
    );
}
