//! Writes `envoy-api.binpb`: Envoy's API as a descriptor set, the one
//! `envoy-types` compiled its types from (its `src/generated/types.bin`, which
//! it does not export), without the comments (`source_code_info`: 3.3 MB of
//! the 4), so that the schema the server checks resources with is the one of
//! the messages it speaks ADS with.
//!
//! cargo run -p origin-policy-xds --example envoy_descriptors -- \
//!     ~/.cargo/registry/src/*/envoy-types-0.7.7/src/generated/types.bin crates/xds/envoy-api.binpb

use prost::Message;
use prost_types::FileDescriptorSet;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [from, to] = args.as_slice() else {
        return Err("usage: envoy_descriptors TYPES_BIN OUT".into());
    };
    let mut set = FileDescriptorSet::decode(std::fs::read(from)?.as_slice())?;
    for file in &mut set.file {
        file.source_code_info = None;
    }
    // Checked before it is written: the server decodes it at start.
    prost_reflect::DescriptorPool::decode(set.encode_to_vec().as_slice())?;
    std::fs::write(to, set.encode_to_vec())?;
    println!("{to}: {} files", set.file.len());
    Ok(())
}
