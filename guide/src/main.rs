//! `dlm-guide`: the gradient server (Open Inference Protocol on ONNX Runtime) — issue 4.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dlm-guide",
    version,
    about = "Guide service: classifier gradients for dlm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve guide models over the Open Inference Protocol (not built yet).
    Serve,
}

fn main() {
    match Cli::parse().command {
        Command::Serve => {
            eprintln!("error: `dlm-guide serve` is not built yet (issue 4)");
            std::process::exit(2);
        }
    }
}
