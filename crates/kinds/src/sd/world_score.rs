//! The `world_score` stage: scores generated pictures of the toy world against their prompts
//! with the world's classifier (`crate::world_check`) — per variant, the share of subject prompts
//! (those with `identifier`) whose shape wears the subject's stripes (whether it is still a star
//! is the shape rate's business), the share of world captions
//! rendered exactly (background, colour and shape), the share of pictures of the bare class
//! (`a star`) that kept its look (no stripes: DreamBooth's class drift), the share of all other
//! prompts free of the stripes, and the background and shape rates. Output: `scores.json`
//! (`metrics`, `overall` per variant, `per_image`), shown in the report's Scores section.
use dreampipe_core::stages::params::{Input, ParamTable, Params};
use dreampipe_core::stages::{DeviceClass, ParamSpec, Stage, StageContext, StageError};
use serde::{Deserialize, Serialize};

/// The metrics of `scores.json`, as (key, display name), ranking by the first, then the third:
/// the subject learned, then the class kept.
pub const METRICS: [(&str, &str); 6] = [
    ("subject", "subject"),
    ("caption", "caption"),
    ("class", "class kept"),
    ("no_stripes", "no stripes"),
    ("background", "background"),
    ("shape", "shape"),
];

pub struct WorldScoreKind;

/// A `world_score` stage's fields (its table is derived: [`Params`]; `generated` is resolved
/// by the runner: `ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct WorldScoreParams {
    /// sample_grid or generate stages (variants and prompts from their manifest.json), or
    /// images stages / folders (with `prompt`); every variant of a swept stage is scored
    #[param(ty = PathOrStageRefList, gathers)]
    pub generated: Input,
    /// the prompt of generated images whose input has none (an images stage or a folder)
    #[param(default = null)]
    pub prompt: Option<String>,
    /// the subject's rare token: prompts with it ask for the subject (the striped star)
    #[param(default = "sks")]
    pub identifier: String,
}

impl Stage for WorldScoreKind {
    fn kind(&self) -> &'static str {
        "world_score"
    }
    /// 2: stripes are orange plus dark inner pixels (luminance), not orange plus black; the
    /// subject rate counts striped shapes of any outline; the class-kept rate.
    fn version(&self) -> u32 {
        2
    }
    fn device_class(&self) -> DeviceClass {
        DeviceClass::Cpu
    }
    fn summary(&self) -> &'static str {
        "Scores generated pictures of the toy world against their prompts with the world's classifier (background, shape colour and kind, the subject's stripes). Output: `scores.json` (per variant: subject, caption, class kept, no stripes, background and shape rates; per image: what was asked and what was seen)."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        WorldScoreParams::param_specs()
    }
    fn run(&self, _ctx: &StageContext<'_>) -> Result<(), StageError> {
        Err(dreampipe_core::stages::needs_torch_worker(self.kind()))
    }
    fn needs_torch(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<WorldScoreParams>(&WorldScoreKind.schema())
            .unwrap();
    }
}
