//! `ferry topology check|show FILE`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::topology;

#[derive(Debug, Args)]
pub struct TopologyArgs {
    #[command(subcommand)]
    pub command: TopologyCommand,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Validate a topology file: prints OK, or every error as FILE:LINE:COLUMN: field: message.
    Check { file: PathBuf },
    /// Print the resolved topology: regions, processes and addresses, topics and their flow.
    Show { file: PathBuf },
}

/// Exit code 1 when the file has errors.
pub fn run(args: TopologyArgs) -> anyhow::Result<std::process::ExitCode> {
    match args.command {
        TopologyCommand::Check { file } => match topology::load(&file) {
            Ok(_) => {
                println!("{}: OK", file.display());
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(errors) => {
                for e in &errors {
                    println!("{e}");
                }
                eprintln!("{}: {} error(s)", file.display(), errors.len());
                Ok(std::process::ExitCode::FAILURE)
            }
        },
        TopologyCommand::Show { file } => match topology::load(&file) {
            Ok(t) => {
                print!("{}", topology::render_tables(&t));
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(errors) => {
                for e in &errors {
                    println!("{e}");
                }
                Ok(std::process::ExitCode::FAILURE)
            }
        },
    }
}
