//! What experiment files may say beyond their fields: a preset `inherits` another (it states
//! only what differs: tables merge key by key, any other value replaces the inherited one),
//! and an entry of a named map (`methods`, `models.classifiers`) may start from a sibling with
//! `base = "NAME"` (then state only what differs from it).

use toml::Table;
use toml::Value;

/// Merges `over` into `under`: tables key by key (recursively), anything else replaced.
pub fn merge(under: &mut Table, over: Table) {
    for (key, value) in over {
        match (under.get_mut(&key), value) {
            (Some(Value::Table(below)), Value::Table(above)) => merge(below, above),
            (_, value) => {
                under.insert(key, value);
            }
        }
    }
}

/// Preset `name` of `presets` with its `inherits` chain resolved (an error names a missing
/// preset or a cycle).
pub fn resolve_preset(presets: &Table, name: &str) -> Result<Table, String> {
    let mut chain = vec![name.to_string()];
    let mut layers = Vec::new();
    let mut current = name.to_string();
    loop {
        let preset = presets
            .get(&current)
            .and_then(Value::as_table)
            .ok_or_else(|| {
                let names: Vec<&str> = presets.keys().map(String::as_str).collect();
                format!("no preset '{current}' (it has: {})", names.join(", "))
            })?;
        let mut preset = preset.clone();
        let parent = match preset.remove("inherits") {
            None => None,
            Some(Value::String(parent)) => Some(parent),
            Some(other) => {
                return Err(format!(
                    "preset '{current}': inherits = {other}: not a name"
                ));
            }
        };
        layers.push(preset);
        match parent {
            None => break,
            Some(parent) if chain.contains(&parent) => {
                return Err(format!(
                    "presets inherit in a cycle: {} -> {parent}",
                    chain.join(" -> ")
                ));
            }
            Some(parent) => {
                chain.push(parent.clone());
                current = parent;
            }
        }
    }
    let mut resolved = Table::new();
    for layer in layers.into_iter().rev() {
        merge(&mut resolved, layer);
    }
    Ok(resolved)
}

/// Resolves `base = "NAME"` in every entry of the map at `path` (dot-separated) of `table`:
/// the entry becomes NAME's (resolved) entry with its own keys merged over it.
pub fn resolve_bases(table: &mut Table, path: &str) -> Result<(), String> {
    let mut map = table;
    for key in path.split('.') {
        match map.get_mut(key).and_then(Value::as_table_mut) {
            Some(inner) => map = inner,
            None => return Ok(()),
        }
    }
    let names: Vec<String> = map.keys().cloned().collect();
    let original = map.clone();
    for name in names {
        let resolved =
            resolve_entry(&original, &name, &mut Vec::new()).map_err(|e| format!("{path}: {e}"))?;
        map.insert(name, Value::Table(resolved));
    }
    Ok(())
}

fn resolve_entry(map: &Table, name: &str, seen: &mut Vec<String>) -> Result<Table, String> {
    let mut entry = map
        .get(name)
        .and_then(Value::as_table)
        .cloned()
        .ok_or_else(|| format!("'{name}' is not defined here (or not a table)"))?;
    let Some(base) = entry.remove("base") else {
        return Ok(entry);
    };
    let base = base
        .as_str()
        .ok_or_else(|| format!("'{name}': base = {base}: not a name"))?
        .to_string();
    if seen.contains(&base) || base == name {
        return Err(format!("'{name}': bases in a cycle through '{base}'"));
    }
    seen.push(name.to_string());
    let mut resolved = resolve_entry(map, &base, seen)?;
    merge(&mut resolved, entry);
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_preset_states_only_what_differs_from_the_one_it_inherits() {
        let presets = parse(
            r#"
            [quick]
            steps = 10
            data = { train = 4, test = 2 }
            list = [1, 2]
            [full]
            inherits = "quick"
            data = { train = 40 }
            list = [3]
            [loop]
            inherits = "loop"
            "#,
        );
        let full = resolve_preset(&presets, "full").unwrap();
        assert_eq!(
            full,
            parse("steps = 10\ndata = { train = 40, test = 2 }\nlist = [3]")
        );
        assert_eq!(
            resolve_preset(&presets, "quick").unwrap(),
            presets["quick"].as_table().unwrap().clone()
        );
        assert!(
            resolve_preset(&presets, "loop")
                .unwrap_err()
                .contains("cycle")
        );
        assert!(
            resolve_preset(&presets, "huge")
                .unwrap_err()
                .contains("no preset 'huge'")
        );
    }

    #[test]
    fn an_entry_starts_from_its_base() {
        let mut table = parse(
            r#"
            [methods]
            UniKE = { kind = "unike", top_k = 40, alpha = "dynamic" }
            "K = 10" = { base = "UniKE", top_k = 10 }
            "K = 10, alpha" = { base = "K = 10", alpha = 0.5 }
            broken = { base = "missing" }
            "#,
        );
        let err = resolve_bases(&mut table.clone(), "methods").unwrap_err();
        assert!(err.contains("'missing' is not defined"), "{err}");
        table["methods"].as_table_mut().unwrap().remove("broken");
        resolve_bases(&mut table, "methods").unwrap();
        assert_eq!(
            table["methods"]["K = 10, alpha"],
            Value::Table(parse(
                r#"kind = "unike"
top_k = 10
alpha = 0.5"#
            ))
        );
    }
}
