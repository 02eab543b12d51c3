//! Chat templates: the Jinja template stored in the model file, rendered with
//! minijinja the way HF `apply_chat_template` renders it (trim_blocks,
//! lstrip_blocks, Python string methods, `raise_exception`).

use minijinja::{context, Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{Error, Result};

/// One message of a chat, after validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

impl ChatMessage {
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
            _ => {
                return Err(Error::invalid_argument(
                    format!("{param}.content"),
                    "is required and must be a string or a list of text parts",
                ))
            }
        };
        Ok(ChatMessage {
            role: role.to_string(),
            content,
        })
    }
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

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
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
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }];
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
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: "  hi ".into(),
        }];
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
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }];
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
