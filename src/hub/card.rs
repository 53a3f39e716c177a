//! Model cards: the `README.md` every `sdkd export` writes, with the metadata header the Hub
//! reads (YAML between `---` lines: `base_model`, `library_name`, `pipeline_tag`, `tags`,
//! `license`) and a body with the recipe, the parameter counts and the evaluation figures.
use serde_json::Value;

/// What a card says about one export.
pub struct Card<'a> {
    pub title: String,
    /// `unet`, `pipeline` or `single-file`.
    pub format: &'a str,
    /// The exported file's name (a single file).
    pub file_name: Option<String>,
    /// The run's recorded config (`StateMeta::config`).
    pub run: &'a Value,
    pub step: u64,
    pub ema: bool,
    pub student_params: u64,
    pub teacher_params: Option<u64>,
    /// The teacher's hub id, when it was one (`base_model`).
    pub base_model: Option<String>,
    /// The teacher's license, from its own card.
    pub license: Option<String>,
    /// The run's evaluation (`eval/step-N/report.json`) at or before this step.
    pub eval: Option<Value>,
}

/// The first line of every card sdkd writes, after the header: how a later export knows the
/// README.md beside a single file is its own.
pub const MARK: &str = "<!-- model card written by sdkd export -->";

/// The YAML header of a card (`---` ... `---`), parsed; None when there is none.
pub fn header(readme: &str) -> Option<serde_yaml::Mapping> {
    let rest = readme.strip_prefix("---\n").or_else(|| readme.strip_prefix("---\r\n"))?;
    let end = rest.find("\n---")?;
    serde_yaml::from_str(&rest[..end + 1]).ok()
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Card<'_> {
    /// The README.md text.
    pub fn render(&self) -> String {
        let run = self.run;
        let mut meta = serde_yaml::Mapping::new();
        let mut put = |k: &str, v: serde_yaml::Value| {
            meta.insert(serde_yaml::Value::String(k.into()), v);
        };
        if let Some(b) = &self.base_model {
            put("base_model", b.clone().into());
        }
        put("library_name", "diffusers".into());
        put("pipeline_tag", "text-to-image".into());
        if let Some(l) = &self.license {
            put("license", l.clone().into());
        }
        let mut tags = vec!["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "distillation", "sdkd"];
        if self.format == "single-file" {
            tags.push("safetensors");
        }
        put("tags", serde_yaml::Value::Sequence(tags.into_iter().map(Into::into).collect()));
        let header = serde_yaml::to_string(&meta).expect("a mapping of strings serialises");

        let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
        let student = text(&run["student"]);
        let teacher = self.base_model.clone().unwrap_or_else(|| text(&run["teacher"]));
        let mut body = format!("---\n{header}---\n{MARK}\n\n# {}\n\n", self.title);
        body += &format!(
            "A Stable Diffusion UNet distilled from `{teacher}` by sdkd (block pruning and knowledge \
             distillation as in BK-SDM), step {} of its run{}.\n\n",
            self.step,
            if self.ema { ", EMA weights" } else { "" }
        );
        body += "| UNet | parameters |\n|---|---|\n";
        if let Some(t) = self.teacher_params {
            body += &format!("| teacher `{teacher}` | {} |\n", group(t));
        }
        let share = self.teacher_params.map(|t| format!(" ({:.1}% of the teacher)", 100.0 * self.student_params as f64 / t as f64)).unwrap_or_default();
        body += &format!("| student `{student}` | {}{share} |\n\n", group(self.student_params));

        body += "## Recipe\n\n";
        let train = &run["train"];
        let loss = &run["loss"];
        let data = &run["data"];
        body += &format!("- student: `{student}`, weights initialised from the {}\n", if run["student_init"] == "random" { "default initialisation (from scratch)" } else { "teacher (copy map)" });
        if run["distill"] == false {
            body += "- loss: task loss only (no distillation)\n";
        } else {
            body += &format!("- loss: task {}, output KD {}, feature KD {}\n", loss["task"], loss["output_kd"], loss["feature_kd"]);
        }
        body += &format!(
            "- steps: {}, batch {} × grad_accum {} (over all processes), learning rate {} ({}), precision {}\n",
            self.step,
            train["batch_size"],
            train["grad_accum"],
            run["optim"]["lr"],
            text(&run["optim"]["schedule"]),
            text(&train["precision"])
        );
        let source = ["shards", "path", "cache"].iter().find_map(|k| data[*k].as_str().map(|s| (*k, s)));
        if let Some((kind, s)) = source {
            let name = std::path::Path::new(s).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| s.to_string());
            body += &format!("- data: `{name}` ({kind}), {} px, caption dropout {}\n", data["resolution"], data.get("caption_dropout").unwrap_or(&Value::from(0)));
        }
        if let Some(e) = &self.eval {
            body += "\n## Evaluation\n\n";
            body += &format!("From the run's evaluation at step {} ({} generated images):\n\n| metric | value |\n|---|---|\n", e["step"], e["count"]);
            for (key, name) in [("fid", "FID"), ("is_mean", "Inception Score"), ("clip_score", "CLIP score")] {
                if let Some(v) = e[key].as_f64() {
                    body += &format!("| {name} | {v:.4} |\n");
                }
            }
        }
        body += "\n## Use\n\n```python\n";
        body += &match (self.format, &self.file_name) {
            ("single-file", Some(f)) => format!("from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_single_file(\"{f}\")\n"),
            ("unet", _) => "from diffusers import UNet2DConditionModel\nunet = UNet2DConditionModel.from_pretrained(\"<this folder or repo>\")\n".into(),
            _ => "from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained(\"<this folder or repo>\")\n".into(),
        };
        body += "```\n";
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_round_trips() {
        let run = serde_json::json!({"student": "bk_small", "teacher": "org/teacher", "train": {"batch_size": 2, "grad_accum": 1}, "loss": {"task": 1.0, "output_kd": 1.0, "feature_kd": 1.0}});
        let card = Card {
            title: "t".into(),
            format: "pipeline",
            file_name: None,
            run: &run,
            step: 2,
            ema: false,
            student_params: 1_500,
            teacher_params: Some(3_000),
            base_model: Some("org/teacher".into()),
            license: Some("openrail++".into()),
            eval: None,
        };
        let text = card.render();
        let h = header(&text).unwrap();
        assert_eq!(h["base_model"], "org/teacher");
        assert_eq!(h["license"], "openrail++");
        assert!(text.contains("| student `bk_small` | 1,500 (50.0% of the teacher) |"), "{text}");
        assert_eq!(group(859_520_964), "859,520,964");
    }
}
