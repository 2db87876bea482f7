//! `corridor` — the command-line tool of Corridor for caseworkers, operators and demos.
//!
//! Caseworker commands talk to a node's local API (`--node`, default
//! `http://127.0.0.1:7080`) with a bearer token (`--token` or `CORRIDOR_TOKEN`).

use corridor_cli::files::{self, MAX_FILE_BYTES};
use corridor_cli::terminal::escape_controls;
use corridor_cli::{client, commands, demo, devpki, errln, outln};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{CaseCommand, ConsentCommand, Output, ReferralCommand};

#[derive(Debug, Parser)]
#[command(
    name = "corridor",
    version,
    about = "Corridor: consent-gated referrals between organisations"
)]
struct Cli {
    /// Local API address of your node.
    #[arg(
        long,
        global = true,
        env = "CORRIDOR_NODE",
        default_value = "http://127.0.0.1:7080"
    )]
    node: String,
    /// Bearer token (prefer the CORRIDOR_TOKEN environment variable or --token-file).
    #[arg(long, global = true, env = "CORRIDOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (readable by its owner only: mode 0600).
    #[arg(long, global = true, env = "CORRIDOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local demo federation of three nodes and walk a referral through it.
    Demo {
        /// Where to write the demo's PKI, configuration, databases and logs
        /// (default: a fresh temporary directory, removed at the end).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the nodes running and print how to use the CLI against them.
        #[arg(long)]
        keep_running: bool,
    },
    /// Write a development PKI, keys, directory and node configurations.
    DevPki {
        /// Output directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Federation name.
        #[arg(long, default_value = "corridor-dev")]
        federation: String,
        /// An org as id:COUNTRY[/REPRESENTS]:role[+role][:name], e.g.
        /// kh-embassy-kl:MY/KH:embassy (in MY, acting for KH) (repeat; default: the demo's
        /// orgs).
        #[arg(long = "org")]
        orgs: Vec<devpki::OrgSpec>,
        /// First port; each org gets a federation port and the next one for its local API.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
    },
    /// Sign a federation directory with a governance key: appends the signature to
    /// `<directory>.sig`, where nodes look for it. A node accepts a directory signed by
    /// the threshold of distinct governance keys its configuration names.
    SignDirectory {
        /// The directory file, exactly as it will be published.
        #[arg(long)]
        directory: PathBuf,
        /// The governance key (base64 Ed25519 seed, mode 0600).
        #[arg(long)]
        key: PathBuf,
    },
    /// Cases.
    #[command(subcommand)]
    Case(CaseCommand),
    /// Consent.
    #[command(subcommand)]
    Consent(ConsentCommand),
    /// Referrals.
    #[command(subcommand)]
    Referral(ReferralCommand),
    /// List referrals received by your node, newest first, a page at a time.
    Inbox {
        /// Referrals per page (at most 1000).
        #[arg(long, default_value_t = 1000)]
        page_size: u32,
        /// Where to go on from: the token the previous page ended with.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Verify nodes' audit logs (as an auditor org, over mutual TLS).
    Audit(corridor_cli::audit::AuditArgs),
    /// Measure Corridor on this machine beside the bare transport and the cryptography.
    Bench(corridor_cli::bench::BenchArgs),
    /// The bare mTLS echo server of `corridor bench`.
    #[command(hide = true)]
    BenchEcho {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        org_dir: PathBuf,
    },
    /// Print the purpose profiles (what each purpose requires and allows, and who may
    /// receive it), or with --fields the field catalogue.
    Profiles {
        /// Print the field catalogue with sensitivity classes instead.
        #[arg(long)]
        fields: bool,
        /// Format.
        #[arg(long = "format", value_enum, default_value = "text")]
        format: commands::ProfilesOutput,
    },
    /// Run a Corridor node (same as corridor-node).
    #[command(hide = true, disable_help_flag = true)]
    Node {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn token(token: Option<String>, token_file: Option<PathBuf>) -> Result<String, String> {
    // An empty one is an unset variable, not a token.
    if let Some(t) = token.filter(|t| !t.trim().is_empty()) {
        return checked_token(t.trim(), "--token or CORRIDOR_TOKEN");
    }
    if let Some(path) = token_file {
        // A token is a secret: its file must be readable by its owner only, as keys are.
        let bytes = files::read_secret_file(&path, MAX_FILE_BYTES)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("the token file {} is not UTF-8 text", path.display()))?;
        if text.trim().is_empty() {
            return Err(format!("the token file {} is empty", path.display()));
        }
        return checked_token(text.trim(), &format!("the token file {}", path.display()));
    }
    Err("no token: set CORRIDOR_TOKEN, or pass --token or --token-file".into())
}

/// Longest text taken for a token; a node issues tokens of 47 characters.
const MAX_TOKEN_LEN: usize = 256;

/// `token` if it can be one: short, printable ASCII (it travels in an HTTP header).
/// Otherwise a sentence naming where it came from, never the text itself (a secret).
fn checked_token(token: &str, source: &str) -> Result<String, String> {
    if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "what {source} holds is not a token: tokens are short printable ASCII text, such as crt_ followed by 43 letters, digits, - or _"
        ));
    }
    Ok(token.to_owned())
}

async fn run(cli: Cli) -> Result<(), String> {
    let output = cli.output;
    // Better a refusal than text where a script expects JSON.
    let text_only = match &cli.command {
        Command::Demo { .. } => Some("demo"),
        Command::DevPki { .. } => Some("dev-pki"),
        Command::SignDirectory { .. } => Some("sign-directory"),
        Command::Bench(_) => Some("bench (its last line is JSON)"),
        _ => None,
    };
    if let (Some(command), Output::Json) = (text_only, output) {
        return Err(format!("--output json is not available for {command}"));
    }
    match cli.command {
        Command::Demo { dir, keep_running } => {
            demo::run(demo::DemoOptions { dir, keep_running }).await
        }
        Command::DevPki {
            out,
            federation,
            orgs,
            base_port,
        } => dev_pki(&out, &federation, orgs, base_port),
        Command::Node { .. } => Err("`corridor node` must come first on the command line".into()),
        Command::SignDirectory { directory, key } => sign_directory(&directory, &key),
        Command::Audit(args) => corridor_cli::audit::run(args, output).await,
        Command::Bench(args) => corridor_cli::bench::run(args).await,
        Command::BenchEcho { listen, org_dir } => {
            corridor_cli::bench::echo_server(listen, &org_dir).await
        }
        Command::Profiles { fields, format } => {
            let format = match (format, output) {
                (commands::ProfilesOutput::Text, Output::Json) => commands::ProfilesOutput::Json,
                (f, _) => f,
            };
            commands::profiles(format, fields);
            Ok(())
        }
        command => {
            let token = token(cli.token, cli.token_file)?;
            let mut client = client::connect(&cli.node, &token).await?;
            match command {
                Command::Case(c) => commands::case(&mut client, output, c).await,
                Command::Consent(c) => commands::consent(&mut client, output, c).await,
                Command::Referral(c) => commands::referral(&mut client, output, c).await,
                Command::Inbox {
                    page_size,
                    page_token,
                } => commands::inbox(&mut client, output, page_size, page_token).await,
                Command::Demo { .. }
                | Command::DevPki { .. }
                | Command::SignDirectory { .. }
                | Command::Node { .. }
                | Command::Profiles { .. }
                | Command::Audit(_)
                | Command::Bench(_)
                | Command::BenchEcho { .. } => Ok(()),
            }
        }
    }
}

fn sign_directory(directory: &std::path::Path, key: &std::path::Path) -> Result<(), String> {
    use std::io::Write as _;
    let key_text = String::from_utf8(files::read_secret_file(key, MAX_FILE_BYTES)?)
        .map_err(|_| format!("secret file {} is malformed: not UTF-8 text", key.display()))?;
    let key = corridor::SigningKey::from_base64(&key_text)
        .map_err(|e| format!("secret file {} is malformed: {e}", key.display()))?;
    let body = files::read_file(directory, MAX_FILE_BYTES)?;
    // Only a valid directory is worth a signature.
    let text = String::from_utf8(body)
        .map_err(|_| format!("the directory {} is not UTF-8 text", directory.display()))?;
    let parsed = corridor::Directory::from_toml(&text)
        .map_err(|e| format!("the directory {} is invalid: {e}", directory.display()))?;
    let path = corridor::directory::signatures_path(directory);
    // Ed25519 signatures are deterministic: the same key over the same bytes gives the
    // same line, which a second copy would only repeat.
    let line = corridor::directory::signature_line(text.as_bytes(), &key);
    // Lines over other bytes sign an earlier version of the file: they are dropped, so
    // the file holds what counts for this one.
    let mut kept = Vec::new();
    let mut stale = 0;
    if path.exists() {
        let existing = files::read_file(&path, MAX_FILE_BYTES)?;
        for l in String::from_utf8_lossy(&existing).lines() {
            match corridor::directory::read_signature_line(text.as_bytes(), l) {
                Some((_, true)) => kept.push(l.trim().to_owned()),
                Some((_, false)) => stale += 1,
                // Comments and blank lines stay as they are.
                None => kept.push(l.to_owned()),
            }
        }
    }
    let dropped = if stale > 0 {
        format!(
            " (dropped {stale} signature(s) over other content: an earlier version of the file)"
        )
    } else {
        String::new()
    };
    if kept.iter().any(|l| l.trim() == line.trim()) && stale == 0 {
        outln!(
            "serial {} of {} is already signed with key {}; {} is unchanged",
            parsed.serial,
            parsed.federation,
            key.verifying_key().to_base64(),
            path.display()
        );
        return Ok(());
    }
    if !kept.iter().any(|l| l.trim() == line.trim()) {
        kept.push(line);
    }
    // Written whole and renamed into place: a reader never sees half a file.
    let tmp = path.with_extension("sig.tmp");
    let mut file =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    for l in &kept {
        writeln!(file, "{l}").map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    }
    file.sync_all()
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    outln!(
        "signed serial {} of {} with key {}; signatures in {}{dropped}",
        parsed.serial,
        parsed.federation,
        key.verifying_key().to_base64(),
        path.display()
    );
    Ok(())
}

fn dev_pki(
    out: &std::path::Path,
    federation: &str,
    orgs: Vec<devpki::OrgSpec>,
    base_port: u16,
) -> Result<(), String> {
    let orgs = if orgs.is_empty() {
        devpki::demo_orgs()
    } else {
        orgs
    };
    let ports = (0..orgs.len())
        .map(|i| {
            let federation = u16::try_from(usize::from(base_port) + 2 * i)
                .ok()
                .filter(|p| *p < u16::MAX)
                .ok_or("--base-port is too high for that many orgs")?;
            Ok(devpki::Ports {
                federation,
                local: federation + 1,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let generated = devpki::generate(out, federation, &orgs, &ports)?;
    outln!("development PKI written to {}", out.display());
    for g in generated {
        outln!(
            "  {:<16} federation 127.0.0.1:{}  local API 127.0.0.1:{}  config {}",
            g.spec.id.as_str(),
            g.ports.federation,
            g.ports.local,
            g.config.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // `corridor node ...` runs the node in this process: the demo starts its nodes this
    // way, so a single binary is all it needs.
    let args = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "node") {
        // Named so in its help and errors: `corridor node`, not `corridor`.
        let program = std::ffi::OsString::from("corridor node");
        return corridor_node::main_from(std::iter::once(program).chain(args.skip(2)));
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("corridor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    let written = corridor_cli::terminal::finish_stdout();
    // A failure to write the output is reported only if nothing else went wrong first.
    match outcome.and(written) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Errors quote what nodes and other organisations said.
            errln!("corridor: {}", escape_controls(&message));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_token_is_no_token() {
        for empty in ["", "  "] {
            let refused = token(Some(empty.into()), None).unwrap_err();
            assert!(refused.starts_with("no token"), "{refused}");
        }
        assert_eq!(token(Some("t0k".into()), None), Ok("t0k".into()));
    }

    #[test]
    fn tokens_are_checked_for_form_and_never_echoed() {
        let issued = "crt_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ";
        assert_eq!(checked_token(issued, "x"), Ok(issued.to_owned()));
        for bad in ["crt_ü", "crt_a b", &"a".repeat(MAX_TOKEN_LEN + 1)] {
            let refused = checked_token(bad, "--token").expect_err(bad);
            assert!(
                refused.contains("not a token") && !refused.contains(bad),
                "{refused}"
            );
        }
    }
}
