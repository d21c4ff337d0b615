//! docs/unsafe.md lists every file of the product crates that uses `unsafe`, with how many
//! sites it has and why each stays. This keeps the list true: a new `unsafe` (or one
//! removed) without the table changed fails here.

use std::collections::BTreeMap;
use std::path::Path;

/// `unsafe {`, `unsafe impl` and `unsafe fn` in one source, as the table counts them.
fn sites(text: &str) -> usize {
    ["unsafe {", "unsafe impl", "unsafe fn"]
        .iter()
        .map(|k| text.matches(k).count())
        .sum()
}

fn walk(dir: &Path, out: &mut BTreeMap<String, usize>, root: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.ends_with("generated") || p.ends_with("target") {
                continue;
            }
            walk(&p, out, root);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let n = sites(&std::fs::read_to_string(&p).unwrap());
            if n > 0 {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, n);
            }
        }
    }
}

#[test]
fn every_unsafe_site_is_counted_and_justified_in_docs_unsafe_md() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = BTreeMap::new();
    for krate in [
        "vmm-core",
        "vmm-devices",
        "vmmctl",
        "blockd",
        "chardevd",
        "migrated",
        "proto",
        "sandbox",
    ] {
        walk(&root.join(krate).join("src"), &mut found, root);
    }
    let doc = std::fs::read_to_string(root.join("docs/unsafe.md")).unwrap();
    let listed: BTreeMap<String, usize> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let n = cells.get(2)?.parse().ok()?;
            Some((cells[1].to_string(), n))
        })
        .collect();
    assert_eq!(
        found, listed,
        "docs/unsafe.md's table must name each file with its count of unsafe sites"
    );
    let total: usize = found.values().sum();
    assert!(
        doc.contains(&format!("**{total}** now")),
        "docs/unsafe.md must give the total, {total}"
    );
}
