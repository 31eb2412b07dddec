//! The README's configuration table is kept in sync with the config code:
//! every variable with its default and meaning, and no variable the code does
//! not know.

use spanbuf::config::VARIABLES;

#[test]
fn readme_lists_every_variable_with_its_default() {
    let readme = include_str!("../README.md");
    for var in VARIABLES {
        let row = format!(
            "| `{}` | `{}` | {} |",
            var.name,
            var.display_default(),
            var.meaning
        );
        assert!(readme.contains(&row), "README lacks the row starting {row}");
    }
    for line in readme.lines().filter(|l| l.starts_with("| `SPANBUF_")) {
        let name = line
            .trim_start_matches("| `")
            .split('`')
            .next()
            .unwrap_or_default();
        assert!(
            VARIABLES.iter().any(|v| v.name == name),
            "README documents {name}, which the config code does not know"
        );
    }
}
