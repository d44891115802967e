//! `probe`: asks a running worker's admin server, for container health
//! checks (the runtime image has no curl): exit 0 on HTTP 200, 1 otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use transfer_worker::error::{Error, Result};

/// GETs a path of the admin server and prints the answer; exit 0 on 200.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The admin server's address (an unspecified address such as 0.0.0.0 means this host).
    #[arg(long, env = "TRANSFER_WORKER_ADMIN_ADDR", default_value = "127.0.0.1:9187")]
    addr: SocketAddr,
    /// What to ask.
    #[arg(long, default_value = "/readyz")]
    path: String,
    /// Give up after this many ms.
    #[arg(long, default_value_t = 2_000)]
    timeout_ms: u64,
}

pub async fn run(args: ProbeArgs) -> Result<()> {
    if !args.path.starts_with('/') || args.path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(format!("--path must be an absolute path without spaces, got {:?}", args.path)));
    }
    let mut addr = args.addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n", args.path);
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(Duration::from_millis(args.timeout_ms), exchange).await {
        Ok(Ok(a)) => String::from_utf8_lossy(&a).into_owned(),
        Ok(Err(e)) => return Err(Error::Unavailable(format!("admin server at {addr}: {e}"))),
        Err(_) => {
            return Err(Error::Unavailable(format!("admin server at {addr}: no answer in {} ms", args.timeout_ms)))
        }
    };
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    super::print_text(body.trim_end());
    if status == "200" {
        Ok(())
    } else {
        Err(Error::Unavailable(format!("{} answered {status} on {}", addr, args.path)))
    }
}
