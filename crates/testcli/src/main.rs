//! `polydev-testcli`: signs in through a browser like Codex or Gemini CLI
//! (see the library docs for the flow, the files and the exit codes).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use polydev_testcli::commands::{self, LoginOptions};
use polydev_testcli::DEFAULT_ISSUER;

#[derive(Parser)]
#[command(
    name = "polydev-testcli",
    version,
    about = "A test CLI that signs in through a browser (OIDC + PKCE)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sign in through the browser and store the tokens in ~/.testcli/auth.json.
    Login {
        /// The OpenID provider.
        #[arg(long, default_value = DEFAULT_ISSUER)]
        issuer: String,
        /// The loopback port for the redirect (0 = any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// How long to wait for the browser to come back.
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
    },
    /// Print who the stored access token belongs to.
    Whoami,
    /// Rotate the stored tokens with the refresh token.
    Refresh,
    /// Print a canned answer to TEXT as a stream of JSON lines (`/slow N`:
    /// one line a second for N seconds).
    Prompt {
        /// The prompt.
        text: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(polydev_testcli::error::EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Login {
                issuer,
                port,
                timeout_secs,
            } => {
                commands::login(&LoginOptions {
                    issuer,
                    port,
                    timeout: Duration::from_secs(timeout_secs),
                })
                .await
            }
            Cmd::Whoami => commands::whoami().await,
            Cmd::Refresh => commands::refresh().await,
            Cmd::Prompt { text } => commands::prompt(&text),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
