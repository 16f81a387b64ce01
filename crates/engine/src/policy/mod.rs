//! What a tenant's policy and the edge's settings say: the model (re-exported
//! here), parsed with every finding at once and checked across fields.
//! Imports nothing of the other stages.

pub(crate) mod admission;
pub(crate) mod checks;
pub(crate) mod diagnostic;
pub mod host;
pub(crate) mod json;
mod model;
pub mod networks;
pub(crate) mod parse;
pub(crate) mod reader;
pub(crate) mod settings;

pub use model::*;
