//! `corridor-node --config node.toml` — see the library documentation.

fn main() -> std::process::ExitCode {
    corridor_node::main_from(std::env::args_os())
}
