//! JSON text exactly as Python's `json.dumps(value, ensure_ascii=False, indent=...,
//! separators=...)` writes it, for template values: transformers renders chat
//! templates with that as `tojson`, and a model reads tool schemas the way it saw
//! them in training (`", "` and `": "`, keys in their order, no HTML escapes, floats
//! as Python's `repr`).

use std::fmt::Write;

use minijinja::value::{Value, ValueKind};

/// `json.dumps(value, ensure_ascii=False, indent=indent, separators=separators)`.
/// `indent` is the text of one level (Python's int `n` is `n` spaces).
pub fn dumps(
    value: &Value,
    indent: Option<&str>,
    separators: Option<(&str, &str)>,
) -> Result<String, String> {
    // Python's defaults: no spaces after items when indenting (the newline is one).
    let (item, key) = separators.unwrap_or(match indent {
        Some(_) => (",", ": "),
        None => (", ", ": "),
    });
    let mut out = String::new();
    Writer {
        indent,
        item,
        key,
        out: &mut out,
    }
    .value(value, 0)?;
    Ok(out)
}

struct Writer<'a> {
    indent: Option<&'a str>,
    item: &'a str,
    key: &'a str,
    out: &'a mut String,
}

impl Writer<'_> {
    fn value(&mut self, v: &Value, depth: usize) -> Result<(), String> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.out.push_str(&number(v)?),
            ValueKind::String => string(self.out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
                self.container('[', ']', depth, &items, |w, item, d| w.value(item, d))?;
            }
            ValueKind::Map => {
                let keys: Vec<Value> = v.try_iter().map_err(|e| e.to_string())?.collect();
                self.container('{', '}', depth, &keys, |w, k, d| {
                    match k.as_str() {
                        Some(s) => string(w.out, s),
                        None => {
                            let text = match k.kind() {
                                ValueKind::Number => number(k)?,
                                ValueKind::Bool => k.is_true().to_string(),
                                _ => "null".to_string(),
                            };
                            string(w.out, &text)
                        }
                    }
                    w.out.push_str(w.key);
                    let item = v.get_item(k).map_err(|e| e.to_string())?;
                    w.value(&item, d)
                })?;
            }
            other => return Err(format!("tojson: cannot serialize a {other} value")),
        }
        Ok(())
    }

    fn container(
        &mut self,
        open: char,
        close: char,
        depth: usize,
        items: &[Value],
        mut each: impl FnMut(&mut Self, &Value, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        self.out.push(open);
        if items.is_empty() {
            self.out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push_str(self.item);
            }
            self.newline(depth + 1);
            each(self, item, depth + 1)?;
        }
        self.newline(depth);
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(unit) = self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(unit);
            }
        }
    }
}

fn number(v: &Value) -> Result<String, String> {
    if v.is_integer() {
        return Ok(v.to_string());
    }
    let f = f64::try_from(v.clone()).map_err(|e| e.to_string())?;
    Ok(float_repr(f))
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits that read
/// back the same, positional for exponents -4..16, else `1e-05` / `1.5e+16`.
fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest digits: "-1.2345e-5", "1e16".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let point = exp as usize + 1;
            if digits.len() <= point {
                out.push_str(&digits);
                out.push_str(&"0".repeat(point - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// A JSON string as Python writes it with `ensure_ascii=False`: only `"`, `\`
/// and control characters are escaped.
fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(json: &str, indent: Option<&str>) -> String {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        dumps(&Value::from_serialize(&v), indent, None).unwrap()
    }

    #[test]
    fn writes_what_python_writes() {
        // Each expected text is Python 3.11's json.dumps(json.loads(input), ensure_ascii=False).
        assert_eq!(
            dump(r#"{"b": 1, "a": [true, null, "é<&>'"], "c": {}}"#, None),
            r#"{"b": 1, "a": [true, null, "é<&>'"], "c": {}}"#
        );
        assert_eq!(dump(r#""tab\t\u0001\"""#, None), r#""tab\t\u0001\"""#);
        assert_eq!(
            dump(r#"{"x": [1, {"y": []}]}"#, Some("  ")),
            "{\n  \"x\": [\n    1,\n    {\n      \"y\": []\n    }\n  ]\n}"
        );
    }

    #[test]
    fn floats_read_as_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (1.5e300, "1.5e+300"),
            (0.0, "0.0"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn separators_replace_the_defaults() {
        let v = Value::from_serialize(serde_json::json!({"a": [1, 2]}));
        assert_eq!(dumps(&v, None, Some((",", ":"))).unwrap(), r#"{"a":[1,2]}"#);
    }
}
