//! # corridor-node — the Corridor node daemon
//!
//! A thin I/O shell around the `corridor` protocol core: tonic services (transport) call
//! workflows, which call storage. One node per organisation.
//!
//! * [`config`] — the TOML configuration and its defaults
//! * [`tls`] — mutual TLS: who a peer is, decided once per connection
//! * [`services`] — the federation and caseworker gRPC services
//! * [`workflows`] — create case, record consent, send and receive referrals
//! * [`delivery`] — the durable outbox and its retry loop
//! * [`storage`] — SQLite through sqlx
//! * [`server`] — start, serve, stop

pub mod audit_log;
pub mod audit_service;
pub mod auth;
pub mod cache;
pub mod config;
pub mod convert;
pub mod courier;
pub mod delivery;
pub mod keys;
pub mod metrics;
pub mod node;
pub mod refusals;
pub mod server;
pub mod services;
pub mod storage;
pub mod tls;
pub mod workflows;
pub mod writer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command-line arguments of `corridor-node`.
#[derive(Debug, Parser)]
#[command(name = "corridor-node", version, about = "Run a Corridor node")]
pub struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = "node.toml", env = "CORRIDOR_NODE_CONFIG")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node (the default).
    Serve,
    /// Issue a bearer token for a local user and print it once, creating the user with
    /// the given role if it does not exist (a user keeps its role). Works whether or not
    /// the node is running.
    CreateToken {
        /// Name of the local user.
        #[arg(long)]
        user: String,
        /// What the user may do: `caseworker` (cases, consents, referrals), `auditor`
        /// (the audit log, nothing of any case) or `admin` (both).
        #[arg(long)]
        role: corridor::LocalRole,
    },
    /// Change a local user's role. Works whether or not the node is running; a running
    /// node applies it within 5 seconds. Users from versions without roles are admins.
    SetRole {
        /// Name of the local user.
        #[arg(long)]
        user: String,
        /// The role it gets: `caseworker`, `auditor` or `admin`.
        #[arg(long)]
        role: corridor::LocalRole,
    },
    /// List the local users: name, role, live tokens, when created. Works whether or not
    /// the node is running.
    ListUsers,
    /// Issue a bearer token for a local administrator: `create-token --role admin`.
    CreateAdminToken {
        /// Name of the local user.
        #[arg(long, default_value = "admin")]
        user: String,
    },
    /// Revoke every token of a local user (a lost laptop, a departed colleague). Works
    /// whether or not the node is running; a running node stops accepting them within
    /// 5 seconds.
    RevokeTokens {
        /// Name of the local user.
        #[arg(long)]
        user: String,
    },
    /// Load and check the configuration, keys, certificate and directory, then exit.
    CheckConfig,
    /// Give a database written before the node kept a pairwise secret a new random one,
    /// for when the signing key it ran with is lost. The case and consent references its
    /// recipients know, request keys and audit pseudonyms all change. Run it with the
    /// node stopped.
    NewPairwiseSecret,
}

/// Whether `user` is a valid local user name.
fn valid_user_name(user: &str) -> Result<(), String> {
    let valid = !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err("user name must be 1-64 characters of letters, digits, '-', '_' or '.'".into())
    }
}

fn init_tracing(config: &config::Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: not in files, journald or pipes.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}

/// Runs `corridor-node` with the given arguments (the first is the program name).
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Only ring is in the dependency graph; make it the process default explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            print_error(&format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            print_error(&message);
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let config = config::Config::load(&args.config).map_err(|e| e.to_string())?;
    match args.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            init_tracing(&config);
            server::serve(config).await.map_err(|e| e.to_string())
        }
        Command::CheckConfig => {
            let check = node::check_config(&config)
                .await
                .map_err(|e| e.to_string())?;
            // Warnings, not errors: the shipped unit runs check-config before every start,
            // and a directory that drops a witness must not keep the node from starting.
            for warning in check.warnings {
                print_error(&format!("warning: {warning}"));
            }
            for note in check.notes {
                print_error(&format!("note: {note}"));
            }
            print_line("configuration is valid")
        }
        Command::NewPairwiseSecret => {
            if node::new_pairwise_secret(&config)
                .await
                .map_err(|e| e.to_string())?
            {
                print_line(
                    "stored a new pairwise secret: recipients will know this node's cases under new references",
                )
            } else {
                Err("this database keeps a pairwise secret already; nothing changed".into())
            }
        }
        Command::RevokeTokens { user } => {
            valid_user_name(&user)?;
            let store = node::open_store(&config).await.map_err(|e| e.to_string())?;
            let now = node::now_ms();
            let revoked = store
                .revoke_tokens(
                    &user,
                    now,
                    Box::new(move |user| {
                        corridor::audit::encode(&corridor::audit::Event::TokenRevoked { user }, now)
                    }),
                )
                .await
                .map_err(|e| e.to_string());
            store.close().await;
            match revoked? {
                None => Err(format!("there is no local user {user}")),
                Some(n) => print_line(&format!("revoked {n} token(s) of {user}")),
            }
        }
        Command::CreateToken { user, role } => issue_token(&config, &user, role).await,
        Command::ListUsers => {
            let store = node::open_store(&config).await.map_err(|e| e.to_string())?;
            let users = store.users().await.map_err(|e| e.to_string());
            store.close().await;
            let users = users?;
            if users.is_empty() {
                return print_line("no local users: create-token makes the first");
            }
            print_line("user\trole\tlive tokens\tcreated")?;
            for (name, role, tokens, created_at_ms) in users {
                print_line(&format!(
                    "{name}\t{role}\t{tokens}\t{}",
                    corridor::utc::format(created_at_ms)
                ))?;
            }
            Ok(())
        }
        Command::SetRole { user, role } => {
            valid_user_name(&user)?;
            let store = node::open_store(&config).await.map_err(|e| e.to_string())?;
            let now = node::now_ms();
            let changed = store
                .set_role(
                    &user,
                    role,
                    Box::new(move |user| {
                        corridor::audit::encode(
                            &corridor::audit::Event::RoleChanged { user, role },
                            now,
                        )
                    }),
                )
                .await
                .map_err(|e| e.to_string());
            store.close().await;
            match changed? {
                None => Err(format!("there is no local user {user}")),
                Some(held) if held == role.as_str() => print_line(&format!(
                    "{user} has the role {role} already; nothing changed"
                )),
                Some(held) => print_line(&format!(
                    "{user} now has the role {role} (it had {held}); a running node applies it within 5 seconds"
                )),
            }
        }
        Command::CreateAdminToken { user } => {
            issue_token(&config, &user, corridor::LocalRole::Admin).await
        }
    }
}

/// Issues a token for the local user `user` of `role` and prints it.
async fn issue_token(
    config: &config::Config,
    user: &str,
    role: corridor::LocalRole,
) -> Result<(), String> {
    valid_user_name(user)?;
    let store = node::open_store(config).await.map_err(|e| e.to_string())?;
    let (token, hash) =
        auth::new_token().map_err(|_| "system randomness unavailable".to_string())?;
    let now = node::now_ms();
    let issued = store
        .issue_token(
            user,
            role,
            &hash,
            now,
            Box::new(move |user| {
                corridor::audit::encode(&corridor::audit::Event::TokenIssued { user, role }, now)
            }),
        )
        .await
        .map_err(|e| e.to_string());
    store.close().await;
    if let Err(held) = issued? {
        return Err(format!(
            "the local user {user} has the role {held}, not {role}: a user keeps its role, so issue the token under another user name"
        ));
    }
    // The token exists only in this line: failing to write it must not look like
    // success.
    print_line(&token)
}

/// Writes one line to standard error, prefixed with the program's name. A failure is
/// ignored: there is nowhere left to report it.
fn print_error(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "corridor-node: {message}");
}

/// Writes one line to standard output, turning a closed pipe or a full disk into an
/// error instead of the panic `println!` would raise.
fn print_line(line: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write to standard output: {e}"))
}
