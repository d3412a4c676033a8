//! Writes a Parquet task file for benchmarks:
//! `cargo run -p labelsync-tests --example gen_parquet -- OUT ROWS [ROWS_PER_GROUP]`.
fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(out), Some(rows)) = (args.next(), args.next()) else {
        eprintln!("usage: gen_parquet OUT ROWS [ROWS_PER_GROUP]");
        std::process::exit(2);
    };
    let rows: usize = rows.parse().expect("ROWS is a number");
    let group: usize = args
        .next()
        .map_or(100_000, |g| g.parse().expect("ROWS_PER_GROUP is a number"));
    labelsync_tests::write_parquet(std::path::Path::new(&out), rows, group);
}
