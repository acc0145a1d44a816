//! Test support only: a well-formed WebAssembly component of another world.
//!
//! It exports `framehost:other/analyze@0.1.0` (`run: func(input: string) -> string`) and
//! nothing of `framehost:plugin`, so a host that loads it as a frame processor must refuse
//! it for the missing `framehost:plugin/processor@0.1.0` export rather than fail later or
//! trap. Never route a job type to it.

wit_bindgen::generate!({
    path: "wit",
    world: "analyzer",
});

struct Analyzer;

impl exports::framehost::other::analyze::Guest for Analyzer {
    /// Counts the input's characters; anything would do.
    fn run(input: String) -> String {
        input.chars().count().to_string()
    }
}

export!(Analyzer);
