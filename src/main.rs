//! The `switchboard` command: thin — it parses arguments, builds, runs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use switchboard::config::{Overrides, Settings};
use switchboard::startup::Application;

/// mimalloc instead of the system allocator: a create allocates and frees many small objects
/// across threads (the request, the actor, its events, the store's batch), where glibc's
/// allocator spent about a tenth of the server's CPU (README "Benchmarks").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Opts the process out of transparent huge pages. mimalloc asks for them on its arenas
/// (`MADV_HUGEPAGE`) and gives freed memory back to the system in 4 KiB pieces, so memory it
/// reuses is faulted in again as a fresh huge page that the kernel zeroes whole (2 MiB for a few
/// KiB): under a stream of creates that zeroing was about a tenth of the server's CPU (README
/// "Benchmarks"). With small pages it goes away. Agent processes inherit the setting, as they
/// inherit other process attributes; nothing else changes for them.
#[cfg(target_os = "linux")]
fn without_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointers; it only sets an
    // attribute of this process. A kernel that does not know it answers EINVAL, ignored.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(not(target_os = "linux"))]
fn without_transparent_huge_pages() {}

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Self-hosted, OpenHands-compatible conversation orchestrator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    #[command(after_help = SETTINGS_HELP)]
    Serve(ServeArgs),
    /// Print the effective settings and the layer that set each (secrets redacted), then exit.
    /// Takes the same options as `serve`.
    #[command(after_help = SETTINGS_HELP)]
    Config(ServeArgs),
    /// Generate load against a running server and report throughput and latency.
    Load(switchboard::load::LoadArgs),
    /// Manage user keys in the store (SQLite or PostgreSQL; works beside a running server).
    /// Each subcommand takes the same options as `serve`, so it finds the same store.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a key for NAME and print it (only this once: the store keeps its hash).
    Add {
        /// The user's name: 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'.
        name: String,
        /// An admin key: sees and touches every conversation.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        options: ServeArgs,
    },
    /// List the keys: name, admin, created (never the key).
    List {
        #[command(flatten)]
        options: ServeArgs,
    },
    /// Revoke NAME's key: refused from the next request on.
    Revoke {
        name: String,
        #[command(flatten)]
        options: ServeArgs,
    },
}

/// Where the settings without a flag are.
const SETTINGS_HELP: &str = "Every setting, including those without a flag: config/default.toml \
(each with its SWITCHBOARD_* environment variable), or `switchboard config` for the effective \
values and where each came from.";

#[derive(Args, Clone)]
struct ServeArgs {
    /// A TOML file layered over config/default.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to bind (SWITCHBOARD_HOST).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind; 0 picks a free one (SWITCHBOARD_PORT).
    #[arg(long)]
    port: Option<u16>,
    /// Data directory (SWITCHBOARD_DATA_DIR).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Store backend: sqlite, postgres or memory (SWITCHBOARD_STORE).
    #[arg(long)]
    store: Option<String>,
    /// Session API key (SWITCHBOARD_SESSION_API_KEY). Unset: generated with the process
    /// runtime, off otherwise; "" turns it off on purpose.
    #[arg(long)]
    session_api_key: Option<String>,
    /// Runtime kind: echo or process (SWITCHBOARD_RUNTIME).
    #[arg(long)]
    runtime: Option<String>,
    /// Serve the built OpenHands web app in DIR at `/` (SWITCHBOARD_FRONTEND_DIR).
    #[arg(long, value_name = "DIR")]
    frontend: Option<PathBuf>,
}

fn main() -> ExitCode {
    without_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config(args) => config(args),
        Command::Keys(command) => keys(command),
        Command::Load(args) => match switchboard::load::run(args) {
            Ok(summary) if summary.conversations_failed == 0 && summary.errors.is_empty() => {
                ExitCode::SUCCESS
            }
            Ok(_) => ExitCode::from(1),
            Err(e) => {
                eprintln!("switchboard load: {e}");
                ExitCode::from(2)
            }
        },
    }
}

impl ServeArgs {
    fn overrides(self) -> Overrides {
        Overrides {
            config_file: self.config,
            host: self.host,
            port: self.port,
            data_dir: self.data_dir,
            store: self.store,
            session_api_key: self.session_api_key,
            runtime: self.runtime,
            frontend: self.frontend,
        }
    }
}

/// `switchboard config`: one `setting = value  # source` line per setting.
fn config(args: ServeArgs) -> ExitCode {
    match Settings::explain(&args.overrides()) {
        Ok((_, lines)) => {
            let width = lines
                .iter()
                .map(|l| l.setting.len() + l.value.len() + 3)
                .max()
                .unwrap_or(0)
                .min(72);
            for line in lines {
                let left = format!("{} = {}", line.setting, line.value);
                println!("{left:<width$}  # {}", line.source);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard: {e}");
            ExitCode::from(2)
        }
    }
}

/// `switchboard keys …`: the new key alone on stdout (for scripts), everything else on stderr.
fn keys(command: KeysCommand) -> ExitCode {
    use switchboard::keys::{self, KeysError};
    let options = match &command {
        KeysCommand::Add { options, .. }
        | KeysCommand::List { options }
        | KeysCommand::Revoke { options, .. } => options,
    };
    let settings = match Settings::load(&options.clone().overrides()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &command {
        KeysCommand::Add { name, admin, .. } => keys::add(&settings, name, *admin).map(|key| {
            let kind = if *admin { "an admin key" } else { "a user key" };
            eprintln!(
                "switchboard: added {kind} for {name:?}. It is shown only now; the store keeps \
                 its hash. Send it as the header X-Session-API-Key."
            );
            println!("{key}");
        }),
        KeysCommand::List { .. } => keys::list(&settings).map(|all| {
            let width = all.iter().map(|k| k.name.len()).max().unwrap_or(0).max(4);
            println!("{:<width$}  admin  created", "name");
            for key in all {
                let admin = if key.admin { "yes" } else { "no" };
                println!("{:<width$}  {admin:<5}  {}", key.name, key.created_at);
            }
        }),
        KeysCommand::Revoke { name, .. } => keys::revoke(&settings, name).map(|()| {
            eprintln!("switchboard: revoked the key of {name:?}");
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ KeysError::Invalid(_)) => {
            eprintln!("switchboard: {e}");
            ExitCode::from(2)
        }
        Err(e @ (KeysError::Store(_) | KeysError::System { .. })) => {
            eprintln!("switchboard: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = args.overrides();
    let settings = match Settings::load(&overrides) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    switchboard::telemetry::init(&settings);
    switchboard::startup::return_large_frees_to_the_os();
    let result = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings).await?;
        // Handlers first: a signal right after the "listening" line must still stop gracefully.
        app.stop_on_signals();
        tracing::info!("switchboard listening on {}", app.url());
        if let Some(line) = app.login_line() {
            // Like Jupyter's token line: for the operator's eyes, never through the log.
            eprintln!("{line}");
        }
        app.run_until_stopped()
            .await
            .map_err(switchboard::startup::StartupError::Serve)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e}");
            ExitCode::from(1)
        }
    }
}
