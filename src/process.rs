//! What this process used, for `spanbuf bench` and the end of `spanbuf
//! replay`: peak resident memory.

/// Peak RSS of this process image: `VmHWM` from `/proc/self/status`. Not
/// `getrusage`'s `ru_maxrss`, which Linux carries across `fork` and `execve`
/// and so would report the orchestrator's peak (it held the generated
/// workload) for every point. 0 where `/proc` is missing.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let kib = line.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?;
                kib.trim().parse::<u64>().ok()
            })
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_a_peak_rss() {
        assert!(super::peak_rss_bytes() > 1024 * 1024);
    }
}
