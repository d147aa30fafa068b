//! weir-sink: the L4 scenario's backend. Reads each connection to its end,
//! answers with the byte count (u64, little endian) and closes. Prints
//! `ready ADDR` once listening.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    weir_testbed::raise_nofile_limit(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        println!("ready {}", listener.local_addr()?);
        loop {
            let (mut s, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors: wait instead of spinning.
                    eprintln!("weir-sink: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&n.to_le_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    })
}
