//! Caption templates: labelled images get captions in their domain's own
//! style, drawn with a seeded RNG from several phrasings (and several names
//! per class). Templates are TOML data; the built-in sets live in
//! `crates/fedcmp-data/templates/` and a user can supply their own file.

use std::path::Path;

use rand::Rng;
use serde::Deserialize;

use crate::{DataError, Result};

/// How template-captioned sources caption their images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaptionStyle {
    /// A template and a class name drawn per image (varied phrasing: most
    /// scored tokens carry style, not content).
    #[default]
    Varied,
    /// The domain's first template with the class's first name, for every
    /// image: the caption is the class's zero-shot prompt, so the scored
    /// tokens carry the image's content (ALGORITHMS.md §7.1).
    Content,
}

/// One domain's caption style.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaptionTemplates {
    pub domain: String,
    pub templates: Vec<String>,
    pub classes: Vec<ClassNames>,
}

/// The ways to name one class.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClassNames {
    pub names: Vec<String>,
}

const FASHION_MNIST: &str = include_str!("../templates/fashion-mnist.toml");

impl CaptionTemplates {
    /// Parses and validates a template file's text; `origin` names it in
    /// errors.
    pub fn parse(origin: &Path, text: &str) -> Result<Self> {
        let bad = |message: String| DataError::Malformed {
            path: origin.to_path_buf(),
            message,
        };
        let t: Self = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if t.templates.is_empty() {
            return Err(bad("`templates` is empty".to_string()));
        }
        if let Some(tpl) = t.templates.iter().find(|s| !s.contains("{label}")) {
            return Err(bad(format!("template {tpl:?} has no {{label}}")));
        }
        if let Some(i) = t.classes.iter().position(|c| c.names.is_empty()) {
            return Err(bad(format!("class {i} has no names")));
        }
        Ok(t)
    }

    /// Reads a template file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The built-in Fashion-MNIST templates.
    pub fn fashion_mnist() -> Result<Self> {
        Self::parse(Path::new("<built-in fashion-mnist.toml>"), FASHION_MNIST)
    }

    /// A caption for class `label`, drawn from `rng`; None for an unknown
    /// class.
    pub fn caption(&self, label: usize, rng: &mut impl Rng) -> Option<String> {
        let names = &self.classes.get(label)?.names;
        let name = &names[rng.random_range(0..names.len())];
        let template = &self.templates[rng.random_range(0..self.templates.len())];
        Some(fill(template, name))
    }

    /// A caption for class `label` in `style` (`rng` is drawn from only for
    /// varied captions); None for an unknown class.
    pub fn caption_in(
        &self,
        style: CaptionStyle,
        label: usize,
        rng: &mut impl Rng,
    ) -> Option<String> {
        match style {
            CaptionStyle::Varied => self.caption(label, rng),
            CaptionStyle::Content => {
                let name = self.classes.get(label)?.names.first()?;
                Some(fill(self.templates.first()?, name))
            }
        }
    }

    /// The canonical (first) name of each class, for zero-shot prompts.
    pub fn class_names(&self) -> Vec<&str> {
        self.classes
            .iter()
            .map(|c| c.names.first().map(String::as_str).unwrap_or(""))
            .collect()
    }
}

/// `template` with `{label}` replaced by `name`, starting with a capital
/// (templates may open with the label).
pub fn fill(template: &str, name: &str) -> String {
    let mut caption = template.replace("{label}", name);
    if let Some(first) = caption.chars().next() {
        let upper: String = first.to_uppercase().collect();
        caption.replace_range(..first.len_utf8(), &upper);
    }
    caption
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn built_in_fashion_templates_parse_and_caption_deterministically() -> Result<()> {
        let t = CaptionTemplates::fashion_mnist()?;
        assert_eq!(t.classes.len(), 10);
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..10)
                .filter_map(|l| t.caption(l, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        assert!(draw(3)
            .iter()
            .all(|c| c.chars().next().is_some_and(char::is_uppercase)));
        assert!(t.caption(10, &mut ChaCha8Rng::seed_from_u64(0)).is_none());
        Ok(())
    }

    #[test]
    fn content_captions_are_the_zero_shot_prompts() -> Result<()> {
        let t = CaptionTemplates::fashion_mnist()?;
        for seed in 0..5 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            for (label, name) in t.class_names().iter().enumerate() {
                let caption = t.caption_in(CaptionStyle::Content, label, &mut rng);
                assert_eq!(caption, Some(fill(&t.templates[0], name)));
            }
        }
        assert_eq!(
            t.caption_in(CaptionStyle::Content, 10, &mut ChaCha8Rng::seed_from_u64(0)),
            None
        );
        Ok(())
    }

    #[test]
    fn bad_template_files_name_the_problem() {
        let p = Path::new("mine.toml");
        let no_label = "domain = \"x\"\ntemplates = [\"hi\"]\n[[classes]]\nnames = [\"a\"]\n";
        let err = CaptionTemplates::parse(p, no_label)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|m| m.contains("mine.toml") && m.contains("{label}")));
        let unknown = "domain = \"x\"\ntemplates = [\"{label}\"]\nfoo = 1\n";
        assert!(CaptionTemplates::parse(p, unknown).is_err());
    }
}
