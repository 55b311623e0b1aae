//! Configuration of a qud run: one serde struct per section, layered loading, validation.
//!
//! Layers, lowest to highest priority: the paper's defaults ([`Config::default`]) < a TOML file <
//! `QUD_`-prefixed environment variables (`QUD_OPTIM__LR=0.05`, `__` separates sections) <
//! `--set optim.lr=0.05` overrides. Unknown keys are errors naming the key and the layer it came
//! from; invalid values are errors naming the field and the rule (see [`Config::validate`]).

mod load;
mod sections;

pub use load::{ConfigError, ConfigLoader, Invalid};
pub use sections::*;

#[cfg(test)]
mod tests;
