//! JSON Schema → Gemini's `Schema` (a subset of OpenAPI 3.0), for `responseSchema` and function
//! `parameters`.
//!
//! Gemini understands types, `properties` / `required`, `items`, string enums, `anyOf`,
//! `nullable`, the usual bounds and a few formats. What it does not understand is handled one of
//! two ways:
//! - dropped, when leaving it out cannot let through an answer the job's schema refuses more
//!   than any model could anyway: annotations (`$schema`, `examples`, `default`…),
//!   `additionalProperties: false` (Gemini never adds properties), formats it does not know
//!   (the answer checks validate against the job's own schema);
//! - refused, when it changes which documents are valid (`oneOf`, `not`, `multipleOf`,
//!   `patternProperties`, a recursive `$ref`…): the provider then cannot carry the job and is
//!   skipped (`skipped_capability`), instead of being asked for a shape the job did not want.
//!
//! Local `$ref`s (`#/$defs/…`, `#/definitions/…`, as pydantic writes them) are inlined; the
//! output is bounded in depth and size, so a hostile schema of references that fan out cannot
//! make it grow exponentially.

use serde_json::{Map, Value, json};

/// Deepest nesting written (Gemini itself refuses deeper schemas long before).
const MAX_DEPTH: usize = 32;
/// Most schema nodes written for one schema, `$ref`s expanded.
const MAX_NODES: usize = 2_000;

/// Keywords that change what is valid and that the subset cannot express.
const REFUSED: &[&str] = &[
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "multipleOf",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "prefixItems",
    "additionalItems",
    "unevaluatedItems",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "$dynamicRef",
    "$recursiveRef",
];

/// Converts `schema` into Gemini's form, or names what cannot be expressed and where.
pub fn convert(schema: &Value) -> Result<Value, String> {
    let mut converter = Converter { root: schema, nodes: 0, expanding: Vec::new() };
    converter.schema(schema, "", 0)
}

/// Whether `schema` is an object schema with no properties (Gemini refuses such an OBJECT, so
/// a function taking no arguments is declared without `parameters`).
pub fn is_empty_object(schema: &Value) -> bool {
    let Some(fields) = schema.as_object() else { return false };
    let typed_object = fields.get("type").is_none_or(|t| t == "object");
    let no_properties = fields.get("properties").and_then(Value::as_object).is_none_or(Map::is_empty);
    typed_object && no_properties && !fields.contains_key("$ref") && !fields.contains_key("anyOf")
}

struct Converter<'a> {
    root: &'a Value,
    nodes: usize,
    /// The `$ref`s being expanded, outermost first: one seen again is a recursive schema.
    expanding: Vec<String>,
}

impl Converter<'_> {
    fn schema(&mut self, schema: &Value, path: &str, depth: usize) -> Result<Value, String> {
        let at = |what: &str| format!("{what} at `{}`", if path.is_empty() { "/" } else { path });
        if depth > MAX_DEPTH {
            return Err(at(&format!("a schema nested deeper than {MAX_DEPTH} levels")));
        }
        self.nodes = self.nodes.saturating_add(1);
        if self.nodes > MAX_NODES {
            return Err(format!("a schema of more than {MAX_NODES} nodes"));
        }
        let Some(fields) = schema.as_object() else {
            return Err(at("a schema that is not an object (`true`, `false`)"));
        };
        if let Some(keyword) = REFUSED.iter().find(|k| fields.contains_key(**k)) {
            return Err(at(&format!("`{keyword}`")));
        }
        if let Some(reference) = fields.get("$ref") {
            return self.reference(reference, fields, path, depth);
        }
        if let Some(all_of) = fields.get("allOf") {
            // pydantic v1 wraps a reference in a one-element allOf to give it a description.
            let [only] = all_of.as_array().map(Vec::as_slice).unwrap_or_default() else {
                return Err(at("`allOf` of more than one schema"));
            };
            let mut inner = self.schema(only, &format!("{path}/allOf/0"), depth.saturating_add(1))?;
            overlay_annotations(&mut inner, fields);
            return Ok(inner);
        }
        if let Some(any_of) = fields.get("anyOf") {
            return self.any_of(any_of, fields, path, depth);
        }
        let (kind, nullable) = type_of(fields).map_err(|what| at(&what))?;
        let mut out = Map::new();
        out.insert("type".into(), json!(kind));
        if nullable || fields.get("nullable") == Some(&Value::Bool(true)) {
            out.insert("nullable".into(), json!(true));
        }
        copy_annotations(fields, &mut out);
        match kind {
            "STRING" => string(fields, &mut out).map_err(|what| at(&what))?,
            "INTEGER" | "NUMBER" => number(kind, fields, &mut out).map_err(|what| at(&what))?,
            "BOOLEAN" => refuse_enum(fields).map_err(|what| at(&what))?,
            "ARRAY" => {
                refuse_enum(fields).map_err(|what| at(&what))?;
                let items = match fields.get("items") {
                    Some(items @ Value::Object(_)) => items,
                    Some(_) => return Err(at("tuple `items`")),
                    None => return Err(at("an array without `items`")),
                };
                out.insert("items".into(), self.schema(items, &format!("{path}/items"), depth.saturating_add(1))?);
                copy_counts(fields, &mut out, &["minItems", "maxItems"]);
            }
            _ => self.object(fields, &mut out, path, depth)?,
        }
        Ok(Value::Object(out))
    }

    fn object(
        &mut self,
        fields: &Map<String, Value>,
        out: &mut Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<(), String> {
        let at = |what: &str| format!("{what} at `{}`", if path.is_empty() { "/" } else { path });
        refuse_enum(fields).map_err(|what| at(&what))?;
        for key in ["additionalProperties", "unevaluatedProperties"] {
            // `false` is what Gemini does anyway, `true` only allows more; a schema for the
            // extra properties (a map) cannot be written.
            if fields.get(key).is_some_and(|v| !v.is_boolean()) {
                return Err(at(&format!("`{key}` with a schema (a map)")));
            }
        }
        let properties = match fields.get("properties") {
            Some(Value::Object(properties)) if !properties.is_empty() => properties,
            Some(Value::Object(_)) | None => return Err(at("an object without properties")),
            Some(_) => return Err(at("`properties` that is not an object")),
        };
        let mut converted = Map::new();
        for (name, property) in properties {
            let inner = self.schema(property, &format!("{path}/properties/{name}"), depth.saturating_add(1))?;
            converted.insert(name.clone(), inner);
        }
        out.insert("properties".into(), Value::Object(converted));
        if let Some(required) = fields.get("required") {
            let names = required.as_array().ok_or_else(|| at("`required` that is not a list"))?;
            let mut kept = Vec::new();
            for name in names {
                let name = name.as_str().ok_or_else(|| at("`required` that names a non-string"))?;
                if !properties.contains_key(name) {
                    // Gemini can only produce listed properties: this object is impossible.
                    return Err(at(&format!("required property `{name}` that is not among `properties`")));
                }
                kept.push(json!(name));
            }
            if !kept.is_empty() {
                out.insert("required".into(), Value::Array(kept));
            }
        }
        copy_counts(fields, out, &["minProperties", "maxProperties"]);
        Ok(())
    }

    fn any_of(
        &mut self,
        any_of: &Value,
        fields: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<Value, String> {
        let at = |what: &str| format!("{what} at `{}`", if path.is_empty() { "/" } else { path });
        let branches = any_of.as_array().filter(|b| !b.is_empty()).ok_or_else(|| at("`anyOf` that is not a list"))?;
        let is_null = |b: &Value| b.get("type").and_then(Value::as_str) == Some("null");
        let nullable = branches.iter().any(is_null);
        let mut converted = Vec::new();
        for (i, branch) in branches.iter().enumerate().filter(|(_, b)| !is_null(b)) {
            converted.push(self.schema(branch, &format!("{path}/anyOf/{i}"), depth.saturating_add(1))?);
        }
        // `anyOf: [X, {"type": "null"}]` (pydantic's Optional[X]) is X, nullable.
        let mut out = match converted.len() {
            0 => return Err(at("`anyOf` of nothing but null")),
            1 => converted.pop().unwrap_or_default(),
            _ => json!({"anyOf": converted}),
        };
        if let (true, Value::Object(out_fields)) = (nullable, &mut out) {
            out_fields.insert("nullable".into(), json!(true));
        }
        overlay_annotations(&mut out, fields);
        Ok(out)
    }

    fn reference(
        &mut self,
        reference: &Value,
        fields: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<Value, String> {
        let at = |what: &str| format!("{what} at `{}`", if path.is_empty() { "/" } else { path });
        let reference = reference.as_str().ok_or_else(|| at("a `$ref` that is not a string"))?;
        let pointer = reference.strip_prefix('#').ok_or_else(|| at(&format!("a non-local `$ref` `{reference}`")))?;
        if self.expanding.iter().any(|r| r == reference) {
            return Err(at(&format!("a recursive `$ref` `{reference}`")));
        }
        let root = self.root;
        let target = root.pointer(pointer).ok_or_else(|| at(&format!("a `$ref` `{reference}` to nothing")))?;
        self.expanding.push(reference.to_string());
        let inner = self.schema(target, &format!("{path}/$ref"), depth.saturating_add(1));
        self.expanding.pop();
        let mut inner = inner?;
        overlay_annotations(&mut inner, fields);
        Ok(inner)
    }
}

/// The Gemini type of a schema, and whether `null` is allowed too (`["string", "null"]`).
fn type_of(fields: &Map<String, Value>) -> Result<(&'static str, bool), String> {
    let gemini = |name: &str| match name {
        "string" => Ok("STRING"),
        "integer" => Ok("INTEGER"),
        "number" => Ok("NUMBER"),
        "boolean" => Ok("BOOLEAN"),
        "array" => Ok("ARRAY"),
        "object" => Ok("OBJECT"),
        other => Err(format!("type `{other}`")),
    };
    match fields.get("type") {
        Some(Value::String(name)) => Ok((gemini(name)?, false)),
        Some(Value::Array(names)) => {
            let nullable = names.iter().any(|n| n == "null");
            let rest: Vec<&Value> = names.iter().filter(|n| *n != "null").collect();
            match rest.as_slice() {
                [Value::String(name)] => Ok((gemini(name)?, nullable)),
                [] => Err("type `null`".into()),
                _ => Err("a union of several types".into()),
            }
        }
        Some(_) => Err("a `type` that is neither a name nor a list".into()),
        // Untyped but unambiguous: what pydantic and hand-written schemas leave implicit.
        None if fields.contains_key("properties") => Ok(("OBJECT", false)),
        None if fields.contains_key("items") => Ok(("ARRAY", false)),
        None if fields.get("enum").and_then(Value::as_array).is_some_and(|e| e.iter().all(Value::is_string)) => {
            Ok(("STRING", false))
        }
        None if fields.get("const").is_some_and(Value::is_string) => Ok(("STRING", false)),
        None => Err("a schema without a type (anything goes)".into()),
    }
}

fn string(fields: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), String> {
    let listed = match (fields.get("enum"), fields.get("const")) {
        (Some(_), Some(_)) => return Err("both `enum` and `const`".into()),
        (Some(Value::Array(values)), None) => Some(values.clone()),
        (Some(_), None) => return Err("an `enum` that is not a list".into()),
        (None, Some(value)) => Some(vec![value.clone()]),
        (None, None) => None,
    };
    if let Some(values) = listed {
        if !values.iter().all(Value::is_string) {
            return Err("an enum of values that are not all strings".into());
        }
        out.insert("format".into(), json!("enum"));
        out.insert("enum".into(), Value::Array(values));
    } else if let Some(format) = fields.get("format").and_then(Value::as_str).filter(|f| *f == "date-time") {
        out.insert("format".into(), json!(format));
    }
    copy_counts(fields, out, &["minLength", "maxLength"]);
    if let Some(pattern) = fields.get("pattern") {
        out.insert("pattern".into(), json!(pattern.as_str().ok_or("a `pattern` that is not a string")?));
    }
    Ok(())
}

fn number(kind: &str, fields: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), String> {
    refuse_enum(fields)?;
    let known: &[&str] = if kind == "INTEGER" { &["int32", "int64"] } else { &["float", "double"] };
    if let Some(format) = fields.get("format").and_then(Value::as_str).filter(|f| known.contains(f)) {
        out.insert("format".into(), json!(format));
    }
    for key in ["minimum", "maximum"] {
        match fields.get(key) {
            Some(bound @ Value::Number(_)) => {
                out.insert(key.into(), bound.clone());
            }
            Some(_) => return Err(format!("a `{key}` that is not a number")),
            None => {}
        }
    }
    Ok(())
}

/// Gemini's enums are strings only.
fn refuse_enum(fields: &Map<String, Value>) -> Result<(), String> {
    match ["enum", "const"].into_iter().find(|k| fields.contains_key(*k)) {
        Some(key) => Err(format!("`{key}` on a type that is not a string")),
        None => Ok(()),
    }
}

fn copy_annotations(fields: &Map<String, Value>, out: &mut Map<String, Value>) {
    for key in ["description", "title"] {
        if let Some(text) = fields.get(key).filter(|v| v.is_string()) {
            out.insert(key.into(), text.clone());
        }
    }
}

/// A `$ref` / `anyOf` / `allOf` wrapper's own description wins over its target's.
fn overlay_annotations(inner: &mut Value, fields: &Map<String, Value>) {
    if let Value::Object(out) = inner {
        copy_annotations(fields, out);
        if fields.get("nullable") == Some(&Value::Bool(true)) {
            out.insert("nullable".into(), json!(true));
        }
    }
}

/// Copies non-negative integer bounds; others are dropped (Gemini would refuse them).
fn copy_counts(fields: &Map<String, Value>, out: &mut Map<String, Value>, keys: &[&str]) {
    for key in keys {
        if let Some(count) = fields.get(*key).and_then(Value::as_u64) {
            out.insert((*key).into(), json!(count));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pydantic_schema_becomes_gemini_types_with_refs_inlined() {
        let schema = json!({
            "$defs": {"Address": {"properties": {"city": {"title": "City", "type": "string"}}, "required": ["city"], "title": "Address", "type": "object"}},
            "properties": {
                "name": {"type": "string", "description": "full name", "minLength": 1},
                "age": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": null},
                "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
                "home": {"$ref": "#/$defs/Address", "description": "where they live"},
                "score": {"type": ["number", "null"], "format": "double"},
                "when": {"type": "string", "format": "date-time"},
                "site": {"type": "string", "format": "uri"}
            },
            "required": ["name", "home"],
            "additionalProperties": false,
            "title": "Person",
            "type": "object"
        });
        let converted = convert(&schema).unwrap();
        assert_eq!(
            converted,
            json!({
                "type": "OBJECT", "title": "Person",
                "properties": {
                    "name": {"type": "STRING", "description": "full name", "minLength": 1},
                    "age": {"type": "INTEGER", "minimum": 0, "nullable": true},
                    "tags": {"type": "ARRAY", "items": {"type": "STRING", "format": "enum", "enum": ["a", "b"]}, "maxItems": 3},
                    "home": {"type": "OBJECT", "title": "Address", "description": "where they live",
                             "properties": {"city": {"type": "STRING", "title": "City"}}, "required": ["city"]},
                    "score": {"type": "NUMBER", "nullable": true, "format": "double"},
                    "when": {"type": "STRING", "format": "date-time"},
                    "site": {"type": "STRING"}
                },
                "required": ["name", "home"]
            })
        );
    }

    #[test]
    fn what_changes_validity_and_cannot_be_written_is_refused_with_its_place() {
        let refused = |schema: Value| convert(&schema).unwrap_err();
        let one_of =
            json!({"type": "object", "properties": {"pet": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}});
        assert_eq!(refused(one_of), "`oneOf` at `/properties/pet`");
        let recursive = json!({"$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
            "$ref": "#/$defs/Node"});
        assert!(refused(recursive).starts_with("a recursive `$ref` `#/$defs/Node`"));
        assert!(refused(json!({"type": "object", "additionalProperties": {"type": "string"}})).contains("a map"));
        assert!(refused(json!({"type": "object"})).contains("an object without properties"));
        assert!(refused(json!({"type": "integer", "enum": [1, 2]})).contains("`enum` on a type that is not a string"));
        assert!(refused(json!({"type": ["string", "integer"]})).contains("a union"));
        assert!(refused(json!({"type": "array"})).contains("without `items`"));
        assert!(refused(json!({"type": "number", "multipleOf": 5})).contains("`multipleOf`"));
        assert!(refused(json!({"$ref": "https://example.org/schema.json"})).contains("non-local"));
        assert!(refused(json!({})).contains("without a type"));
        let impossible = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]});
        assert!(refused(impossible).contains("`b`"));
    }

    #[test]
    fn references_that_fan_out_are_bounded_not_expanded_exponentially() {
        // Each level refers to the next twice: 2^40 nodes if expanded naively.
        let mut defs = Map::new();
        for level in 0..40 {
            let next = json!({"$ref": format!("#/$defs/L{}", level + 1)});
            defs.insert(format!("L{level}"), json!({"type": "object", "properties": {"a": next.clone(), "b": next}}));
        }
        defs.insert("L40".into(), json!({"type": "string"}));
        let schema = json!({"$defs": defs, "$ref": "#/$defs/L0"});
        let refused = convert(&schema).unwrap_err();
        assert!(refused.contains("nodes") || refused.contains("deeper"), "{refused}");
    }

    #[test]
    fn empty_objects_are_recognised_for_functions_without_arguments() {
        assert!(is_empty_object(&json!({"type": "object", "properties": {}})));
        assert!(is_empty_object(&json!({})));
        assert!(!is_empty_object(&json!({"type": "object", "properties": {"a": {"type": "string"}}})));
        assert!(!is_empty_object(&json!({"type": "string"})));
    }
}
