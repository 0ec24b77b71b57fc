//! The special token ids a decoder was trained with (BOS, EOS, PAD), read
//! from the backbone's own metadata, never guessed by name when a file
//! declares them.
//!
//! A Hugging Face folder may declare each role in up to four files:
//! `tokenizer_config.json` and `special_tokens_map.json` (`bos_token`,
//! `eos_token`, `pad_token`: a token string or `{"content": ...}`),
//! `generation_config.json` and `config.json` (`bos_token_id`, ...: an id
//! or a list of ids; generation stops at any of them). A GGUF file declares
//! them once, in `tokenizer.ggml.*_token_id`. Every declaration of a role
//! must share at least one id with every other (a list agrees with an id it
//! contains); files that disagree are an error naming each of them,
//! because training with the wrong BOS silently shifts every loss. The id
//! used is the first id, of the most specific file, that all declarations
//! share (the tokenizer's files first: they are what tokenises prompts).
//! Only a role that no file declares falls back to well-known token names,
//! with a warning.

use std::fmt;
use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// What a special token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialRole {
    Bos,
    Eos,
    Pad,
}

impl SpecialRole {
    const ALL: [Self; 3] = [Self::Bos, Self::Eos, Self::Pad];

    fn id_field(self) -> &'static str {
        match self {
            Self::Bos => "bos_token_id",
            Self::Eos => "eos_token_id",
            Self::Pad => "pad_token_id",
        }
    }

    fn token_field(self) -> &'static str {
        match self {
            Self::Bos => "bos_token",
            Self::Eos => "eos_token",
            Self::Pad => "pad_token",
        }
    }

    /// Names that, by convention, carry the role; only used when no file
    /// declares it.
    fn conventional_names(self) -> &'static [&'static str] {
        match self {
            Self::Bos => &["<s>", "<|begin_of_text|>", "<|endoftext|>"],
            Self::Eos => &["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"],
            Self::Pad => &[],
        }
    }
}

impl fmt::Display for SpecialRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bos => "BOS",
            Self::Eos => "EOS",
            Self::Pad => "PAD",
        })
    }
}

/// One file's claim about a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// Where it was said, for people: "config.json `bos_token_id`".
    pub source: String,
    /// The token as written, when the file names a token rather than an id.
    pub token: Option<String>,
    /// The ids it names (several for a list of EOS ids).
    pub ids: Vec<u32>,
}

impl fmt::Display for Declaration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.token, self.ids.as_slice()) {
            (Some(token), [id]) => write!(f, "{} = {token:?} (id {id})", self.source),
            (_, [id]) => write!(f, "{} = {id}", self.source),
            (_, ids) => write!(f, "{} = {ids:?}", self.source),
        }
    }
}

/// The resolved special ids of one backbone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    /// Every id generation stops at: the EOS and any other ids the files
    /// list as end-of-sequence (e.g. a chat model's end-of-turn).
    pub stop: Vec<u32>,
}

/// The one id every declaration of `role` agrees on (None when there is no
/// declaration), or an error listing the declarations that disagree.
/// `declarations` are in priority order.
pub fn agree(
    role: SpecialRole,
    declarations: &[Declaration],
    origin: &Path,
) -> Result<Option<u32>> {
    let Some(first) = declarations.first() else {
        return Ok(None);
    };
    let shared = first
        .ids
        .iter()
        .copied()
        .find(|id| declarations.iter().all(|d| d.ids.contains(id)));
    match shared {
        Some(id) => Ok(Some(id)),
        None => {
            let listed: Vec<String> = declarations.iter().map(ToString::to_string).collect();
            Err(ModelError::config(
                origin,
                role.token_field(),
                format!(
                    "the files disagree on the {role} token: {}; correct the file that is wrong",
                    listed.join("; ")
                ),
            ))
        }
    }
}

impl SpecialTokens {
    /// Resolves every role of a Hugging Face folder; `token_id` maps a token
    /// string to its id in the folder's tokenizer.
    pub fn from_hf_folder(folder: &Path, token_id: &dyn Fn(&str) -> Option<u32>) -> Result<Self> {
        // Priority order: the tokenizer's own files, then the model's.
        let token_files = ["tokenizer_config.json", "special_tokens_map.json"];
        let id_files = ["generation_config.json", "config.json"];
        let mut read = Vec::new();
        for name in token_files.into_iter().chain(id_files) {
            let path = folder.join(name);
            if let Some(json) = read_json(&path, name)? {
                read.push((name, path, json));
            }
        }
        let mut out = Self::default();
        for role in SpecialRole::ALL {
            let mut declarations = Vec::new();
            for (name, path, json) in &read {
                let declaration = if token_files.contains(name) {
                    token_declaration(path, name, json, role, token_id)?
                } else {
                    id_declaration(path, name, json, role)?
                };
                declarations.extend(declaration);
            }
            let mut id = agree(role, &declarations, folder)?;
            if declarations.is_empty() {
                id = role.conventional_names().iter().find_map(|n| {
                    let id = token_id(n)?;
                    tracing::warn!(
                        folder = %folder.display(),
                        "no file declares the {role} token; using `{n}` (id {id}) by its name"
                    );
                    Some(id)
                });
            }
            match role {
                SpecialRole::Bos => out.bos = id,
                SpecialRole::Eos => {
                    out.eos = id;
                    out.stop = stop_ids(id, &declarations);
                }
                SpecialRole::Pad => out.pad = id,
            }
        }
        Ok(out)
    }

    /// The ids of a GGUF file's `tokenizer.ggml.*_token_id` metadata.
    pub fn from_gguf(bos: Option<u32>, eos: Option<u32>, pad: Option<u32>) -> Self {
        Self {
            bos,
            eos,
            pad,
            stop: eos.into_iter().collect(),
        }
    }

    /// Checks every id against the vocabulary size.
    pub fn check_range(&self, vocab_size: usize, origin: &Path) -> Result<()> {
        let named = [("BOS", self.bos), ("EOS", self.eos), ("PAD", self.pad)];
        let all = named
            .into_iter()
            .filter_map(|(role, id)| id.map(|id| (role, id)))
            .chain(self.stop.iter().map(|&id| ("stop", id)));
        for (role, id) in all {
            if id as usize >= vocab_size {
                return Err(ModelError::config(
                    origin,
                    role,
                    format!("token id {id} is outside the vocabulary of {vocab_size} tokens"),
                ));
            }
        }
        Ok(())
    }
}

/// The EOS first, then every other listed end-of-sequence id once.
fn stop_ids(eos: Option<u32>, declarations: &[Declaration]) -> Vec<u32> {
    let mut stop: Vec<u32> = eos.into_iter().collect();
    for id in declarations.iter().flat_map(|d| d.ids.iter().copied()) {
        if !stop.contains(&id) {
            stop.push(id);
        }
    }
    stop
}

fn read_json(path: &Path, file: &'static str) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::format(path, file, e.to_string()))
}

/// `bos_token_id` and friends: an id, a list of ids, or null.
fn id_declaration(
    path: &Path,
    file: &str,
    json: &Value,
    role: SpecialRole,
) -> Result<Option<Declaration>> {
    let field = role.id_field();
    let bad = || {
        ModelError::config(
            path,
            field,
            "expected a token id (a non-negative integer), a list of them, or null",
        )
    };
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad)
    };
    let ids = match json.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items.iter().map(as_id).collect::<Result<Vec<_>>>()?,
        Some(v) => vec![as_id(v)?],
    };
    Ok((!ids.is_empty()).then(|| Declaration {
        source: format!("{file} `{field}`"),
        token: None,
        ids,
    }))
}

/// `bos_token` and friends: a token string, `{"content": token, ...}`, or
/// null; the token must be in the tokenizer.
fn token_declaration(
    path: &Path,
    file: &str,
    json: &Value,
    role: SpecialRole,
    token_id: &dyn Fn(&str) -> Option<u32>,
) -> Result<Option<Declaration>> {
    let field = role.token_field();
    let token = match json.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(ModelError::config(
                    path,
                    format!("{field}.content"),
                    "expected the token as a string",
                ))
            }
        },
        Some(_) => {
            return Err(ModelError::config(
                path,
                field,
                "expected a token string, an object with `content`, or null",
            ))
        }
    };
    let id = token_id(&token).ok_or_else(|| {
        ModelError::config(
            path,
            field,
            format!("{token:?} is not a token of the folder's tokenizer.json"),
        )
    })?;
    Ok(Some(Declaration {
        source: format!("{file} `{field}`"),
        token: Some(token),
        ids: vec![id],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decl(source: &str, ids: &[u32]) -> Declaration {
        Declaration {
            source: source.into(),
            token: None,
            ids: ids.to_vec(),
        }
    }

    #[test]
    fn a_list_agrees_with_an_id_it_holds_and_the_first_file_picks() {
        let origin = Path::new("m");
        let ds = [
            decl("tok", &[9]),
            decl("gen", &[7, 8, 9]),
            decl("cfg", &[9]),
        ];
        assert_eq!(agree(SpecialRole::Eos, &ds, origin).ok(), Some(Some(9)));
        let ds = [decl("gen", &[7, 8, 9]), decl("cfg", &[8, 9])];
        assert_eq!(agree(SpecialRole::Eos, &ds, origin).ok(), Some(Some(8)));
        assert_eq!(agree(SpecialRole::Bos, &[], origin).ok(), Some(None));
    }

    #[test]
    fn disagreement_names_every_file() {
        let ds = [
            Declaration {
                source: "tokenizer_config.json `bos_token`".into(),
                token: Some("<|im_start|>".into()),
                ids: vec![1],
            },
            decl("config.json `bos_token_id`", &[0]),
        ];
        let msg = agree(SpecialRole::Bos, &ds, Path::new("model"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("tokenizer_config.json `bos_token` = \"<|im_start|>\" (id 1)"),
            "{msg}"
        );
        assert!(msg.contains("config.json `bos_token_id` = 0"), "{msg}");
        assert!(msg.starts_with("model:"), "{msg}");
    }

    proptest! {
        /// The agreed id is one every declaration names, and when there is
        /// none the declarations really share nothing.
        #[test]
        fn the_agreed_id_is_in_every_declaration(
            lists in prop::collection::vec(prop::collection::vec(0u32..6, 1..4), 1..5)
        ) {
            let ds: Vec<Declaration> =
                lists.iter().enumerate().map(|(i, ids)| decl(&format!("f{i}"), ids)).collect();
            match agree(SpecialRole::Eos, &ds, Path::new("m")) {
                Ok(Some(id)) => {
                    prop_assert!(ds.iter().all(|d| d.ids.contains(&id)));
                    prop_assert_eq!(ds[0].ids.iter().find(|i| ds.iter().all(|d| d.ids.contains(i))), Some(&id));
                }
                Ok(None) => prop_assert!(false, "declarations were given"),
                Err(_) => prop_assert!((0..6).all(|id| ds.iter().any(|d| !d.ids.contains(&id)))),
            }
        }
    }
}
