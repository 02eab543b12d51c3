//! Chat templates: the Jinja template stored in the model file, rendered with
//! minijinja the way HF `apply_chat_template` renders it (trim_blocks,
//! lstrip_blocks, Python string methods, `raise_exception`, and transformers' own
//! `tojson`, see `pyjson`).

use minijinja::value::Kwargs;
use minijinja::{context, Environment, ErrorKind, Value};
use serde::Serialize;

use super::pyjson;
use crate::error::{Error, Result};

/// One message of a chat, after validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's calls, OpenAI-shaped, each `function.arguments` an object (as
    /// templates expect it; clients send it as JSON text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool message's answer to this call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

impl ChatMessage {
    /// A plain message: a role and its text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    /// Reads OpenAI-shaped messages: `content` a string or a list of text parts.
    pub fn parse_list(json: &serde_json::Value) -> Result<Vec<ChatMessage>> {
        let items = json
            .as_array()
            .ok_or_else(|| Error::invalid_argument("messages", "must be a list of messages"))?;
        if items.is_empty() {
            return Err(Error::invalid_argument(
                "messages",
                "must contain at least one message",
            ));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, m)| Self::parse(i, m))
            .collect()
    }

    fn parse(i: usize, m: &serde_json::Value) -> Result<ChatMessage> {
        let param = format!("messages[{i}]");
        let obj = m.as_object().ok_or_else(|| {
            Error::invalid_argument(&param, "must be an object with 'role' and 'content'")
        })?;
        let role = obj.get("role").and_then(|r| r.as_str()).ok_or_else(|| {
            Error::invalid_argument(format!("{param}.role"), "is required and must be a string")
        })?;
        if !ROLES.contains(&role) {
            return Err(Error::invalid_argument(
                format!("{param}.role"),
                format!("'{role}' is not one of {}", ROLES.join(", ")),
            ));
        }
        let content = match obj.get("content") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (
                        p.get("type").and_then(|t| t.as_str()),
                        p.get("text").and_then(|t| t.as_str()),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(Error::invalid_argument(
                                format!("{param}.content[{j}]"),
                                "only {\"type\": \"text\", \"text\": ...} parts are supported",
                            ))
                        }
                    }
                }
                text
            }
            Some(serde_json::Value::Null) | None if role == "assistant" => String::new(),
            // A tool's answer is often JSON already; a template renders it as text.
            Some(v) if role == "tool" && !v.is_null() => v.to_string(),
            _ => {
                return Err(Error::invalid_argument(
                    format!("{param}.content"),
                    "is required and must be a string or a list of text parts",
                ))
            }
        };
        let text = |key: &str| -> Result<Option<String>> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Error::invalid_argument(
                    format!("{param}.{key}"),
                    "must be a string",
                )),
            }
        };
        let tool_calls = match obj.get("tool_calls") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(calls)) if role == "assistant" => Some(
                calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| tool_call(&format!("{param}.tool_calls[{j}]"), c))
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(_) => {
                return Err(Error::invalid_argument(
                    format!("{param}.tool_calls"),
                    "must be a list, on an assistant message",
                ))
            }
        };
        Ok(ChatMessage {
            role: role.to_string(),
            content,
            tool_calls,
            tool_call_id: text("tool_call_id")?,
            name: text("name")?,
        })
    }
}

/// One of an assistant message's `tool_calls`, checked, with its `arguments` JSON
/// text read into an object (what vLLM hands templates too).
fn tool_call(param: &str, call: &serde_json::Value) -> Result<serde_json::Value> {
    let bad = |why: &str| Error::invalid_argument(param, why);
    let mut call = call.clone();
    let function = call
        .get_mut("function")
        .and_then(serde_json::Value::as_object_mut)
        .ok_or_else(|| bad("needs a 'function' object with 'name' and 'arguments'"))?;
    if !function
        .get("name")
        .is_some_and(serde_json::Value::is_string)
    {
        return Err(bad("'function.name' must be a string"));
    }
    if let Some(serde_json::Value::String(text)) = function.get("arguments") {
        let args: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| bad(&format!("'function.arguments' is not JSON: {e}")))?;
        function.insert("arguments".into(), args);
    }
    Ok(call)
}

pub struct ChatTemplate {
    env: Environment<'static>,
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(_format: String) -> String {
    // Templates use this for a "today is" line; ZSE renders without a clock dependency.
    String::new()
}

/// transformers' `tojson`: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent, separators=separators)`, keys in their order; minijinja's own
/// escapes HTML and writes compact JSON, so a tool's schema would read differently
/// to the model than it did in training.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    // `ensure_ascii` and `sort_keys` are accepted as transformers' are: off.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v.clone()).map_err(|_| {
                minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: bad indent")
            })?),
        }),
    };
    let separators = match separators.as_deref() {
        None => None,
        Some([item, key]) => Some((item.as_str(), key.as_str())),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
    };
    pyjson::dumps(&value, indent.as_deref(), separators)
        .map(Value::from_safe_string)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self { env })
    }

    /// The prompt for `messages`. `extra` are more variables for the template (the
    /// request's `chat_template_kwargs`, e.g. `enable_thinking`); they never replace
    /// the four the engine sets.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            ..Value::from_serialize(extra)
        })
        .map_err(|e| Error::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NONE: std::sync::LazyLock<serde_json::Map<String, serde_json::Value>> =
        std::sync::LazyLock::new(serde_json::Map::new);

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let msgs = vec![ChatMessage::new("user", "Hi")];
        assert_eq!(
            t.render(&msgs, true, "", "", &NONE).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&msgs, false, "", "", &NONE).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}").unwrap();
        let msgs = vec![ChatMessage::new("user", "  hi ")];
        assert_eq!(t.render(&msgs, false, "", "", &NONE).unwrap(), "HI");
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}").unwrap();
        assert!(t
            .render(&msgs, false, "", "", &NONE)
            .unwrap_err()
            .to_string()
            .contains("roles must alternate"));
    }

    #[test]
    fn extra_variables_reach_the_template_but_never_replace_the_engines() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% if enable_thinking is defined and not enable_thinking %}\
             <think></think>{% endif %}{{ messages[0]['content'] }}{{ tag | default('') }}",
        )
        .unwrap();
        let msgs = vec![ChatMessage::new("user", "Hi")];
        let extra = |v: serde_json::Value| v.as_object().cloned().unwrap();
        assert_eq!(t.render(&msgs, true, "<s>", "", &NONE).unwrap(), "<s>Hi");
        let off = extra(serde_json::json!({"enable_thinking": false, "tag": "!"}));
        assert_eq!(
            t.render(&msgs, true, "<s>", "", &off).unwrap(),
            "<s><think></think>Hi!"
        );
        let clash = extra(serde_json::json!({"bos_token": "X", "messages": []}));
        assert_eq!(t.render(&msgs, true, "<s>", "", &clash).unwrap(), "<s>Hi");
    }

    #[test]
    fn tool_calls_reach_the_template_with_their_arguments_as_objects() {
        let j = serde_json::json!([
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"z\": 1, \"a\": \"é\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": {"ok": true}},
        ]);
        let msgs = ChatMessage::parse_list(&j).unwrap();
        assert_eq!(msgs[1].content, r#"{"ok":true}"#);
        let t = ChatTemplate::new(
            "{% for m in messages %}{% for c in m.tool_calls or [] %}\
             {{ c.function.arguments | tojson }}{{ c.function | tojson(indent=1) }}{% endfor %}\
             {{ m.tool_call_id or '' }}{% endfor %}",
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs, false, "", "", &NONE).unwrap(),
            "{\"z\": 1, \"a\": \"é\"}{\n \"name\": \"f\",\n \"arguments\": {\n  \"z\": 1,\n  \"a\": \"é\"\n }\n}c1"
        );
        for bad in [
            serde_json::json!([{"role": "user", "content": "x", "tool_calls": []}]),
            serde_json::json!([{"role": "assistant", "tool_calls": [{"function": {}}]}]),
            serde_json::json!([{"role": "assistant", "tool_calls": [
                {"function": {"name": "f", "arguments": "{"}}]}]),
        ] {
            assert!(ChatMessage::parse_list(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn broken_template_is_an_error() {
        assert!(matches!(
            ChatTemplate::new("{% for %}"),
            Err(Error::Template(_))
        ));
    }

    #[test]
    fn parses_text_parts_and_rejects_bad_messages() {
        let j = serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
        assert_eq!(ChatMessage::parse_list(&j).unwrap()[0].content, "ab");
        let bad = [
            serde_json::json!([]),
            serde_json::json!([{"role": "wizard", "content": "x"}]),
            serde_json::json!([{"role": "user"}]),
            serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            serde_json::json!("hello"),
        ];
        for b in bad {
            assert!(
                matches!(
                    ChatMessage::parse_list(&b),
                    Err(Error::InvalidArgument { .. })
                ),
                "{b}"
            );
        }
    }
}
