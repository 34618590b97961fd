//! `outboxctl stream ...`: define and list streams through a relay's admin
//! port (`PUT /api/v1/streams/{name}`, `GET /api/v1/streams`).

use std::path::Path;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::cli::DefinitionArgs;
use crate::client::{Client, Failure, Service};

/// The fields of a definition, as the admin API takes them.
const FIELDS: [&str; 7] = [
    "topic",
    "ordering_key",
    "ordering_key_default",
    "on_poison",
    "schema",
    "writers",
    "claim_check",
];

/// A stream's stored definition (`GET`), or `None` when there is none.
pub async fn get(client: &Client, name: &str) -> Result<Option<Value>, Failure> {
    let request = client.request(Service::Admin, Method::GET, &path(name));
    match client.call(Service::Admin, request).await {
        Ok(stream) => Ok(Some(stream)),
        Err(Failure::Refused(message)) if message.contains("stream_not_found") => Ok(None),
        Err(other) => Err(other),
    }
}

fn path(name: &str) -> String {
    format!("/api/v1/streams/{name}")
}

/// The definition part of a stream as the API shows it.
fn definition_of(stream: &Value) -> Map<String, Value> {
    FIELDS
        .iter()
        .filter_map(|field| {
            let value = stream.get(*field)?;
            (!value.is_null()).then(|| ((*field).to_owned(), value.clone()))
        })
        .collect()
}

/// Stores a definition (`PUT`): whether it was created.
async fn put(
    client: &Client,
    name: &str,
    definition: &Map<String, Value>,
) -> Result<(bool, Value), Failure> {
    let request = client
        .request(Service::Admin, Method::PUT, &path(name))
        .json(definition);
    let response = client.send(Service::Admin, request).await?;
    let created = response.status() == reqwest::StatusCode::CREATED;
    let body = crate::client::json_of(response).await?;
    Ok((created, body))
}

/// The definition the flags describe, over `base` (the stored one when
/// updating).
fn merge(
    mut base: Map<String, Value>,
    args: &DefinitionArgs,
) -> Result<Map<String, Value>, Failure> {
    let mut set = |field: &str, value: Option<Value>| {
        if let Some(value) = value {
            base.insert(field.to_owned(), value);
        }
    };
    set("topic", args.topic.clone().map(Value::String));
    set("ordering_key", args.ordering_key.clone().map(Value::String));
    set(
        "ordering_key_default",
        args.ordering_key_default.clone().map(Value::String),
    );
    set("on_poison", args.on_poison.clone().map(Value::String));
    if let Some(file) = &args.schema {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Failure::Usage(format!("cannot read the schema {}: {e}", file.display()))
        })?;
        let schema: Value = serde_json::from_str(&text)
            .map_err(|e| Failure::Usage(format!("{} is not JSON: {e}", file.display())))?;
        base.insert("schema".to_owned(), schema);
    }
    if args.no_schema {
        base.remove("schema");
    }
    if !args.writers.is_empty() {
        base.insert("writers".to_owned(), json!(args.writers));
    }
    if args.any_writer {
        base.remove("writers");
    }
    if let Some(url) = &args.claim_check_url {
        let mut setting = json!({ "url": url });
        if let Some(above) = args.claim_check_above_bytes {
            setting["above_bytes"] = json!(above);
        }
        base.insert("claim_check".to_owned(), setting);
    }
    if args.no_claim_check {
        base.remove("claim_check");
    }
    Ok(base)
}

pub async fn create(client: &Client, name: &str, args: &DefinitionArgs) -> Result<Value, Failure> {
    if get(client, name).await?.is_some() {
        return Err(Failure::Refused(format!(
            "stream {name} exists: `outboxctl stream update {name} ...` changes it"
        )));
    }
    if args.topic.is_none() {
        return Err(Failure::Usage("a new stream needs --topic".to_owned()));
    }
    let definition = merge(Map::new(), args)?;
    Ok(put(client, name, &definition).await?.1)
}

pub async fn update(client: &Client, name: &str, args: &DefinitionArgs) -> Result<Value, Failure> {
    let stored = get(client, name).await?.ok_or_else(|| {
        Failure::Refused(format!(
            "no stream {name}: `outboxctl stream create {name} --topic ...` defines it"
        ))
    })?;
    let definition = merge(definition_of(&stored), args)?;
    Ok(put(client, name, &definition).await?.1)
}

/// One declared stream of an `apply` file.
#[derive(Deserialize)]
struct Declared {
    name: String,
    #[serde(flatten)]
    definition: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Declaration {
    List(Vec<Declared>),
    Wrapped { streams: Vec<Declared> },
}

/// What `apply` did to one stream.
pub struct Applied {
    pub name: String,
    /// `created`, `updated` or `unchanged`.
    pub outcome: &'static str,
}

/// Reads a declaration: JSON, or YAML by the file's extension.
fn read_declaration(file: &Path) -> Result<Vec<Declared>, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?;
    let yaml = matches!(
        file.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    let declaration: Declaration = if yaml {
        serde_norway::from_str(&text).map_err(|e| {
            Failure::Usage(format!("{} is not the YAML expected: {e}", file.display()))
        })?
    } else {
        serde_json::from_str(&text).map_err(|e| {
            Failure::Usage(format!("{} is not the JSON expected: {e}", file.display()))
        })?
    };
    let streams = match declaration {
        Declaration::List(streams) | Declaration::Wrapped { streams } => streams,
    };
    let mut names = std::collections::BTreeSet::new();
    for stream in &streams {
        if !names.insert(stream.name.clone()) {
            return Err(Failure::Usage(format!(
                "{} declares stream {} twice",
                file.display(),
                stream.name
            )));
        }
        if let Some(unknown) = stream
            .definition
            .keys()
            .find(|k| !FIELDS.contains(&k.as_str()))
        {
            return Err(Failure::Usage(format!(
                "stream {}: unknown field {unknown:?} (known: name, {})",
                stream.name,
                FIELDS.join(", ")
            )));
        }
    }
    Ok(streams)
}

/// Creates or updates every declared stream whose stored definition
/// differs; streams the file does not declare are left as they are.
pub async fn apply(client: &Client, file: &Path) -> Result<Vec<Applied>, Failure> {
    let declared = read_declaration(file)?;
    let mut applied = Vec::with_capacity(declared.len());
    for stream in declared {
        let stored = get(client, &stream.name).await?;
        let same = stored.as_ref().is_some_and(|s| {
            let stored = definition_of(s);
            // Defaults the server fills in count as given.
            let mut wanted = stream.definition.clone();
            wanted
                .entry("ordering_key".to_owned())
                .or_insert_with(|| json!("global"));
            wanted
                .entry("on_poison".to_owned())
                .or_insert_with(|| json!("halt"));
            wanted.retain(|_, v| !v.is_null());
            let mut stored = stored;
            // A default key means something in `field:` mode only; the
            // server keeps none otherwise.
            let field_mode = wanted
                .get("ordering_key")
                .and_then(Value::as_str)
                .is_some_and(|m| m.starts_with("field:"));
            if !field_mode {
                wanted.remove("ordering_key_default");
            }
            if !wanted.contains_key("ordering_key_default") {
                stored.remove("ordering_key_default");
            }
            stored == wanted
        });
        let outcome = if same {
            "unchanged"
        } else {
            let (created, _) = put(client, &stream.name, &stream.definition).await?;
            if created { "created" } else { "updated" }
        };
        applied.push(Applied {
            name: stream.name,
            outcome,
        });
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declaration_reads_as_json_or_yaml_and_refuses_what_it_does_not_know() {
        let dir = std::env::temp_dir().join(format!("outboxctl-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("streams.yaml");
        std::fs::write(
            &yaml,
            "streams:\n  - name: orders\n    topic: orders\n    ordering_key: field:/customer/id\n  - name: audit\n    topic: audit\n    writers: [billing]\n",
        )
        .unwrap();
        let streams = read_declaration(&yaml).unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[0].definition["ordering_key"], "field:/customer/id");
        assert_eq!(streams[1].definition["writers"], json!(["billing"]));
        let json = dir.join("streams.json");
        std::fs::write(&json, r#"[{"name": "a", "topic": "t", "colour": "red"}]"#).unwrap();
        assert!(matches!(read_declaration(&json), Err(Failure::Usage(m)) if m.contains("colour")));
        std::fs::write(
            &json,
            r#"[{"name": "a", "topic": "t"}, {"name": "a", "topic": "u"}]"#,
        )
        .unwrap();
        assert!(matches!(read_declaration(&json), Err(Failure::Usage(m)) if m.contains("twice")));
    }

    #[test]
    fn flags_replace_what_they_name_and_keep_the_rest() {
        let stored = json!({"stream": "s", "topic": "t", "ordering_key": "global", "on_poison": "halt",
            "schema": {"type": "object"}, "writers": ["a"], "leader": null});
        let args = DefinitionArgs {
            on_poison: Some("dead-letter".into()),
            any_writer: true,
            ..DefinitionArgs::default()
        };
        let merged = merge(definition_of(&stored), &args).unwrap();
        assert_eq!(merged["topic"], "t");
        assert_eq!(merged["on_poison"], "dead-letter");
        assert_eq!(merged["schema"], json!({"type": "object"}));
        assert!(!merged.contains_key("writers") && !merged.contains_key("leader"));
    }
}
