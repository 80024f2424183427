//! `soak` (placeholder).
use crate::ctx::{Common, Ctx};
use crate::report::Report;
use anyhow::Result;
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(long)]
    pub viewers: Option<usize>,
}
pub async fn run(_ctx: &Ctx, _c: &Common, _a: &Args, _r: &mut Report) -> Result<()> {
    Ok(())
}
