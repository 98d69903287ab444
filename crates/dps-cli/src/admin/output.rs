//! How admin commands print what the service answered: JSON (the default, for scripts) or a
//! table for people.

use serde_json::Value;

/// Output format, `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// The service's JSON, pretty-printed.
    #[default]
    Json,
    /// Aligned columns (lists) or field/value rows (one item).
    Table,
}

/// A list column: a heading and the JSON pointer of the value under it.
pub type Column = (&'static str, &'static str);

/// Prints one item.
pub fn item(format: Format, value: &Value) {
    match format {
        Format::Json => println!("{}", pretty(value)),
        Format::Table => {
            let mut rows = Vec::new();
            flatten("", value, &mut rows);
            let rows: Vec<Vec<String>> = rows.into_iter().map(|(k, v)| vec![k, v]).collect();
            print!("{}", table(&["FIELD", "VALUE"], &rows));
        }
    }
}

/// Prints a list, with `columns` in table form.
pub fn list(format: Format, items: &[Value], columns: &[Column]) {
    match format {
        Format::Json => println!("{}", pretty(&Value::Array(items.to_vec()))),
        Format::Table => {
            let heads: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|it| columns.iter().map(|(_, p)| it.pointer(p).map(scalar).unwrap_or_default()).collect())
                .collect();
            print!("{}", table(&heads, &rows));
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A value as one cell: strings bare, arrays joined, objects as compact JSON.
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(scalar).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn flatten(prefix: &str, v: &Value, rows: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, child) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, child, rows);
            }
        }
        other => rows.push((prefix.to_string(), scalar(other))),
    }
}

/// Left-aligned columns separated by two spaces; control characters in cells are escaped so
/// a value cannot forge lines of the table.
fn table(heads: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |s: &str| s.chars().flat_map(char::escape_default).collect::<String>();
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| clean(c)).collect()).collect();
    let mut widths: Vec<usize> = heads.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&heads.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_escape() {
        let t = table(&["ID", "STATUS"], &[vec!["dev-1".into(), "enabled".into()], vec!["a\nb".into(), "x".into()]]);
        assert_eq!(t, "ID     STATUS\ndev-1  enabled\na\\nb   x\n");
    }

    #[test]
    fn items_flatten_to_dotted_fields() {
        let mut rows = Vec::new();
        flatten("", &json!({"a": {"b": 1, "c": ["x", "y"]}, "d": null}), &mut rows);
        assert_eq!(rows, vec![("a.b".into(), "1".into()), ("a.c".into(), "x,y".into()), ("d".into(), String::new())]);
    }
}
