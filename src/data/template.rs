//! A model's prompt template: how its chat format wraps a query, and where the image goes.
//!
//! Editing prompts are stored in the task's template ("Question: {q} Short answer:",
//! [`crate::data::record::vqa_prompt`]); a chat model such as LLaVA-1.5 reads them inside its
//! own turn format, with the image at its `<image>` marker. BLIP-2 has no such template: its
//! processor puts the query tokens before BOS and the prompt after it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The file in a model directory that overrides the architecture's default template.
pub const TEMPLATE_FILE: &str = "prompt_template.json";

/// `{image}` marks where the image goes, `{prompt}` the query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTemplate {
    /// For a query on an image: one `{image}` and one `{prompt}`.
    pub with_image: String,
    /// For a text-only query: one `{prompt}`, no `{image}`.
    pub text_only: String,
}

impl PromptTemplate {
    /// LLaVA-1.5's chat template for one user turn, as transformers' `llava-1.5-*-hf`
    /// processors render it with `add_generation_prompt`.
    pub fn llava_1_5() -> Self {
        Self {
            with_image: "USER: {image}\n{prompt} ASSISTANT:".into(),
            text_only: "USER: {prompt} ASSISTANT:".into(),
        }
    }

    /// The template of the model in `dir`: its [`TEMPLATE_FILE`] if it has one, else `default`.
    pub fn for_model(dir: &Path, default: Self) -> Result<Self> {
        let path = dir.join(TEMPLATE_FILE);
        if !path.is_file() {
            return Ok(default);
        }
        crate::error::read_json_config(&path, Self::check)
    }

    /// Each placeholder where it must be, once.
    pub fn check(&self) -> std::result::Result<(), String> {
        let count = |text: &str, p: &str| text.matches(p).count();
        if count(&self.with_image, "{image}") != 1 || count(&self.with_image, "{prompt}") != 1 {
            return Err(format!(
                "with_image must hold one {{image}} and one {{prompt}}: {:?}",
                self.with_image
            ));
        }
        if count(&self.text_only, "{image}") != 0 || count(&self.text_only, "{prompt}") != 1 {
            return Err(format!(
                "text_only must hold one {{prompt}} and no {{image}}: {:?}",
                self.text_only
            ));
        }
        Ok(())
    }

    /// The text around the image for `prompt`: what comes before the image, what after.
    pub fn around_image(&self, prompt: &str) -> (String, String) {
        let (before, after) = self
            .with_image
            .split_once("{image}")
            .expect("a checked template");
        (before.to_string(), after.replace("{prompt}", prompt))
    }

    /// The whole text of a text-only query.
    pub fn text(&self, prompt: &str) -> String {
        self.text_only.replace("{prompt}", prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_and_the_prompt_go_where_the_template_says() {
        let t = PromptTemplate::llava_1_5();
        t.check().unwrap();
        let (before, after) = t.around_image("Question: what? Short answer:");
        assert_eq!(before, "USER: ");
        assert_eq!(after, "\nQuestion: what? Short answer: ASSISTANT:");
        assert_eq!(t.text("hi"), "USER: hi ASSISTANT:");
    }

    #[test]
    fn a_template_without_its_placeholders_is_refused_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TEMPLATE_FILE);
        std::fs::write(
            &path,
            r#"{"with_image": "USER: {prompt}", "text_only": "{prompt}"}"#,
        )
        .unwrap();
        let err = PromptTemplate::for_model(dir.path(), PromptTemplate::llava_1_5())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(TEMPLATE_FILE) && err.contains("{image}"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let default = PromptTemplate::for_model(dir.path(), PromptTemplate::llava_1_5()).unwrap();
        assert_eq!(default, PromptTemplate::llava_1_5());
    }
}
