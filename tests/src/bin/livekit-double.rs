//! `livekit-double`: the LiveKit protocol double from the tests, run on its own, so a room
//! job can be tried end to end on one machine without a LiveKit server.
//!
//! It listens on loopback, prints the URL and the API key and secret a host mints tokens
//! with, and in each named room plays the vision service (the stream generator) whenever a
//! subscriber is there: a run of frames, then the publisher leaves (which ends a host's
//! job), then it waits for the next subscriber. Test support, never a server for real use.

use std::time::Duration;

use clap::Parser;
use framehost_tests::livekit::generator::{StreamGenerator, StreamOptions};
use framehost_tests::livekit::{DoubleOptions, LiveKitDouble};

#[derive(Parser)]
#[command(
    about = "Run the LiveKit protocol double from framehost's tests, publishing synthetic \
             frames in the rooms named, for trying room jobs locally"
)]
struct Cli {
    /// Rooms to publish in (repeat the flag for more).
    #[arg(long = "room", default_value = "demo")]
    rooms: Vec<String>,
    /// Identity of the simulated publisher (the job's `source_identity`).
    #[arg(long, default_value = "vision-service")]
    identity: String,
    /// Frames per second.
    #[arg(long, default_value_t = 5.0)]
    fps: f64,
    /// Frames per run; after them the publisher leaves.
    #[arg(long, default_value_t = 50)]
    frames: u64,
    /// JPEG size target, in KiB.
    #[arg(long, default_value_t = 60)]
    image_kib: u32,
    /// API key the double accepts tokens for.
    #[arg(long, default_value = "devkey")]
    api_key: String,
    /// API secret the double verifies tokens with.
    #[arg(long, default_value = "secret")]
    api_secret: String,
    /// Play one run per room, then exit, instead of waiting for the next subscriber.
    #[arg(long)]
    once: bool,
    /// Signal port on 127.0.0.1 (LiveKit's own default is 7880) [default: a free port].
    #[arg(long, default_value_t = 0)]
    port: u16,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let double = match LiveKitDouble::start(DoubleOptions {
        api_key: cli.api_key.clone(),
        api_secret: cli.api_secret.clone(),
        ping_interval_secs: 5,
        ping_timeout_secs: 15,
        port: cli.port,
        ..Default::default()
    })
    .await
    {
        Ok(double) => double,
        Err(error) => {
            eprintln!("error: cannot start the double: {error}");
            std::process::exit(2);
        }
    };
    eprintln!("rendering frames (~{} KiB)...", cli.image_kib);
    let generator = match StreamGenerator::new(StreamOptions {
        fps: cli.fps,
        frames: Some(cli.frames),
        image_kib: cli.image_kib,
        ..Default::default()
    }) {
        Ok(generator) => generator,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    println!("LiveKit double listening at {}\n", double.url());
    println!("# for the host's configuration file:");
    println!("[livekit]");
    println!("url = \"{}\"", double.url());
    println!("api_key = \"{}\"", cli.api_key);
    println!("api_secret = \"{}\"\n", cli.api_secret);
    for room in &cli.rooms {
        // What a job's `token` or FRAMEHOST_LIVEKIT_TOKEN can carry instead: a hidden,
        // subscribe-only grant for this room, valid for ten minutes.
        println!(
            "# a token for room {room:?}, valid 10 minutes (FRAMEHOST_LIVEKIT_TOKEN, or a job's \"token\"):\n{}\n",
            double.subscriber_token(room, &format!("viewer-{room}"))
        );
    }
    println!(
        "publishing {} frames at {} fps as {:?} in room(s) {} {}",
        cli.frames,
        cli.fps,
        cli.identity,
        cli.rooms.join(", "),
        if cli.once {
            "when a subscriber joins, once"
        } else {
            "whenever a subscriber joins"
        }
    );

    let mut tasks = Vec::new();
    for room in cli.rooms.clone() {
        let (double, generator, identity) =
            (double.clone(), generator.clone(), cli.identity.clone());
        let once = cli.once;
        tasks.push(tokio::spawn(async move {
            loop {
                while double.subscribers(&room) == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                println!("{room}: a subscriber joined; publishing");
                let sent = generator.run(&double.publisher(&room, &identity)).await;
                println!(
                    "{room}: sent {} frames ({} packets, {:.1} MiB); publisher left",
                    sent.frames,
                    sent.packets,
                    sent.bytes as f64 / (1 << 20) as f64
                );
                if once {
                    return;
                }
                // The subscriber's job ends on the departure; wait for it to go.
                while double.subscribers(&room) > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    tokio::select! {
        _ = futures::future::join_all(tasks) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("stopping"),
    }
}
