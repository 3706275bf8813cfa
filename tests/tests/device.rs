//! The DMA device as the guest's PCI subsystem sees it (identity, BAR0, MSI-X capability), and
//! the device flags of `aiodma run` (issue: PCI transport).

// Integration tests fail by panicking; helpers outside #[test] fns count too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aiodma_tests::{Guest, RunOutcome, TempDir};

const DEV: &str = "/sys/bus/pci/devices/0000:00:01.0";

/// Print the function's identity and its configuration space between markers.
fn probe_script() -> String {
    format!(
        "ls /sys/bus/pci/devices; \
         echo ids $(cat {DEV}/vendor {DEV}/device {DEV}/class); \
         echo bridge $(cat /sys/bus/pci/devices/0000:00:00.0/class); \
         echo bar0 $(head -n 1 {DEV}/resource); \
         echo driver $(readlink {DEV}/driver); \
         echo msi-vectors $(ls {DEV}/msi_irqs 2>/dev/null | wc -l); \
         echo config-begin; od -A n -v -t x1 {DEV}/config; echo config-end; \
         dmesg | grep -i pci"
    )
}

/// The configuration bytes the guest dumped.
fn config_bytes(out: &RunOutcome) -> Vec<u8> {
    let dump: Vec<u8> = out
        .stdout
        .lines()
        .skip_while(|l| l.trim() != "config-begin")
        .skip(1)
        .take_while(|l| l.trim() != "config-end")
        .flat_map(|l| l.split_whitespace())
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    assert!(dump.len() >= 64, "no config dump\n{}", out.report());
    dump
}

fn u16_at(c: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([c[off], c[off + 1]])
}

fn u32_at(c: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([c[off], c[off + 1], c[off + 2], c[off + 3]])
}

/// Walk the capability list: (id, offset) pairs.
fn capabilities(c: &[u8]) -> Vec<(u8, usize)> {
    let mut caps = Vec::new();
    if u16_at(c, 0x06) & 0x10 == 0 {
        return caps;
    }
    let mut ptr = usize::from(c[0x34] & !3);
    while ptr >= 0x40 && ptr + 1 < c.len() && caps.len() < 48 {
        caps.push((c[ptr], ptr));
        ptr = usize::from(c[ptr + 1] & !3);
    }
    caps
}

/// Check identity, BAR0 and the MSI-X capability for a device with `queues` queues.
fn check_device(out: &RunOutcome, queues: u16) {
    out.assert_code(0)
        .assert_stdout_contains("0000:00:00.0")
        .assert_stdout_contains("0000:00:01.0")
        .assert_stdout_contains("ids 0x1234 0xa10d 0x018000")
        .assert_stdout_contains("bridge 0x060000")
        .assert_stdout_contains("pci 0000:00:01.0: BAR 0 [mem 0xc0000000-0xc0003fff]");
    assert!(!out.stdout.contains("PCI: Fatal"), "{}", out.report());
    let bar0 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("bar0 "))
        .unwrap_or_else(|| panic!("no resource line\n{}", out.report()));
    assert!(
        bar0.starts_with("0x00000000c0000000 0x00000000c0003fff "),
        "BAR0 {bar0}\n{}",
        out.report()
    );

    let c = config_bytes(out);
    assert_eq!(u16_at(&c, 0x00), 0x1234);
    assert_eq!(u16_at(&c, 0x02), 0xa10d);
    assert_eq!(c[0x08], 2, "revision = ABI version");
    assert_eq!(u16_at(&c, 0x2c), 0x1234, "subsystem vendor");
    assert_eq!(u16_at(&c, 0x2e), 0x0001, "subsystem");
    assert_eq!(c[0x3d], 0, "no interrupt pin");
    assert_eq!(u32_at(&c, 0x10), 0xc000_0000, "BAR0: 32-bit memory");
    let caps = capabilities(&c);
    let &(_, msix) = caps
        .iter()
        .find(|(id, _)| *id == 0x11)
        .unwrap_or_else(|| panic!("no MSI-X capability in {caps:?}\n{}", out.report()));
    let control = u16_at(&c, msix + 2);
    assert_eq!(
        control & 0x7ff,
        queues,
        "table size field: {queues} queues + config vector - 1"
    );
    // MSI-X is off until a driver enables it; then Linux lists its vectors.
    let line = |prefix: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line\n{}", out.report()))
            .trim()
            .to_string()
    };
    let vectors: u16 = line("msi-vectors ").parse().unwrap();
    if line("driver").is_empty() {
        assert_eq!(control & 0xc000, 0, "MSI-X enabled without a driver");
        assert_eq!(vectors, 0);
    } else if control & 0x8000 != 0 {
        assert!(
            (1..=queues + 1).contains(&vectors),
            "{vectors} MSI-X vectors for {queues} queues\n{}",
            out.report()
        );
    }
    assert_eq!(u32_at(&c, msix + 4), 0x3000, "table at BAR0 + 0x3000");
    assert_eq!(u32_at(&c, msix + 8), 0x3800, "PBA at BAR0 + 0x3800");
}

#[test]
fn guest_sees_the_device_with_msix() {
    let out = Guest::new().sh(&probe_script());
    check_device(&out, 1);
}

#[test]
fn queues_flag_sizes_the_msix_table() {
    let out = Guest::new()
        .flag("--queues")
        .flag("5")
        .flag("--queue-size")
        .flag("64")
        .sh(&probe_script());
    check_device(&out, 5);
}

#[test]
fn file_backing_opens_and_metrics_carry_the_device() {
    // The backing file's directory is shared read-write in the emulated host; the device opens
    // the file read-write at start, so a bad share fails the run with code 2.
    let dir = TempDir::new("device-backing");
    let image = dir.0.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let metrics = dir.0.join("metrics.json");
    let out = Guest::new()
        .flag("--backing")
        .flag(image.to_str().unwrap())
        .flag("--metrics")
        .flag(metrics.to_str().unwrap())
        .sh(&format!("cat {DEV}/vendor"));
    out.assert_code(0).assert_stdout_contains("0x1234");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert!(
        v["device"]["requests"].is_object(),
        "no device metrics in {v}"
    );
    assert!(v["device"]["doorbells"].is_u64(), "{v}");
}

#[test]
fn no_device_leaves_only_the_host_bridge() {
    let dir = TempDir::new("no-device");
    let metrics = dir.0.join("metrics.json");
    let out = Guest::new()
        .flag("--no-device")
        .flag("--metrics")
        .flag(metrics.to_str().unwrap())
        .sh("ls /sys/bus/pci/devices; dmesg | grep -i pci");
    out.assert_code(0)
        .assert_stdout_contains("0000:00:00.0")
        .assert_stdout_contains("PCI: Using configuration type 1");
    assert!(!out.stdout.contains("0000:00:01.0"), "{}", out.report());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert!(v["device"].is_null(), "{v}");
}

#[test]
fn bad_device_flags_are_one_line_and_exit_2() {
    let dir = TempDir::new("device-flags");
    let missing = dir.0.join("missing.img");
    let missing = missing.to_str().unwrap();
    for (flags, needle) in [
        (vec!["--queue-size", "100"], "--queue-size"),
        (vec!["--queue-size", "0"], "--queue-size"),
        (vec!["--queue-size", "65536"], "--queue-size"),
        (vec!["--queues", "0"], "--queues"),
        (vec!["--queues", "64"], "--queues"),
        (vec!["--backing", "mem:abc"], "abc"),
        (vec!["--backing", "mem:0"], "mem:0"),
        (vec!["--backing", ""], "--backing"),
        (vec!["--backing", missing], "missing.img"),
        (vec!["--fault", "explode"], "explode"),
        (vec!["--fault", "error:p=2"], "p=2"),
        (vec!["--fault", "delay:min=5ms,max=1ms"], "delay"),
        (vec!["--fault-seed", "x"], "--fault-seed"),
    ] {
        let mut guest = Guest::new();
        for f in &flags {
            guest = guest.flag(*f);
        }
        let out = guest.run(&["/bin/true"]);
        out.assert_code(2);
        assert_eq!(
            out.stderr.lines().count(),
            1,
            "{flags:?}: not one line\n{}",
            out.report()
        );
        assert!(
            out.stderr.contains(needle),
            "{flags:?}: error does not name {needle:?}\n{}",
            out.report()
        );
    }
}

/// A guest program (C, built here with `gcc -static`) that drives the device through the
/// sysfs BAR0 mapping with no driver loaded.
const POKE_C: &str = r#"// Drives the aiodma device from guest userspace through the sysfs BAR0 mapping, without a
// driver: reset, negotiation, one queue, MSI-X, two GET_ID requests (the second with its vector
// masked), unmask, reset. Prints key=value lines for the host to check.
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define DEV "/sys/bus/pci/devices/0000:00:01.0/"
static volatile uint8_t *bar;
#define R8(o) (*(volatile uint8_t *)(bar + (o)))
#define R16(o) (*(volatile uint16_t *)(bar + (o)))
#define R32(o) (*(volatile uint32_t *)(bar + (o)))

static void fail(const char *what) { printf("FAIL %s\n", what); exit(1); }
static void msleep(int ms) { struct timespec t = {0, ms * 1000000L}; nanosleep(&t, 0); }
static uint64_t phys(void *p) {
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t e = 0;
    if (fd < 0 || pread(fd, &e, 8, ((uintptr_t)p / 4096) * 8) != 8 || !(e >> 63)) fail("pagemap");
    close(fd);
    return (e & ((1ULL << 55) - 1)) * 4096 + ((uintptr_t)p & 4095);
}
static void *page(void) {
    void *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED, -1, 0);
    if (p == MAP_FAILED) fail("mmap page");
    memset(p, 0, 4096);
    return p;
}
static void reset(void) {
    R8(0x14) = 0;
    for (int i = 0; R8(0x14) != 0; i++) { if (i > 2000) fail("reset"); msleep(1); }
}
struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct hdr { uint32_t op, flags; uint64_t id, offset; uint32_t length, reserved; };

int main(void) {
    int fd = open(DEV "resource0", O_RDWR | O_SYNC);
    if (fd < 0) fail("open resource0");
    bar = mmap(0, 0x4000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (bar == MAP_FAILED) fail("mmap BAR0");
    printf("num_queues=%u\n", R16(0x12));
    printf("capacity=%llu\n", (unsigned long long)*(volatile uint64_t *)(bar + 0x1000));
    reset();
    R8(0x14) = 1; R8(0x14) = 3;
    R32(0x08) = 0; R32(0x0c) = 0x3;  /* FLUSH | GET_ID */
    R32(0x08) = 1; R32(0x0c) = 0x1;  /* VERSION_1 */
    R8(0x14) = 0xb;
    printf("features_ok=%#x\n", R8(0x14));
    /* MSI-X on (capability at 0x40), vectors 0 and 1 to APIC 0, vectors with no handler. */
    int cfg = open(DEV "config", O_RDWR);
    uint16_t ctl = 0x8000;
    if (cfg < 0 || pwrite(cfg, &ctl, 2, 0x42) != 2) fail("enable MSI-X");
    /* Bus mastering on, as pci_set_master does: without it the device moves no data (SPEC 1). */
    uint16_t cmd = 0;
    if (pread(cfg, &cmd, 2, 0x04) != 2) fail("read command");
    cmd |= 0x4;
    if (pwrite(cfg, &cmd, 2, 0x04) != 2) fail("enable bus mastering");
    for (int v = 0; v < 2; v++) {
        R32(0x3000 + 16 * v) = 0xfee00000;
        R32(0x3004 + 16 * v) = 0;
        R32(0x3008 + 16 * v) = 0xdd + v;
        R32(0x300c + 16 * v) = 0;
    }
    struct desc *d = page();
    uint16_t *avail = page();
    uint8_t *used = page(), *buf = page();
    R16(0x16) = 0; R16(0x18) = 8; R16(0x1a) = 1;
    printf("queue_vector=%u\n", R16(0x1a));
    uint64_t pd = phys(d), pa = phys(avail), pu = phys(used);
    R32(0x20) = pd; R32(0x24) = pd >> 32;
    R32(0x28) = pa; R32(0x2c) = pa >> 32;
    R32(0x30) = pu; R32(0x34) = pu >> 32;
    R16(0x1c) = 1;
    R8(0x14) = 0xf;
    printf("driver_ok=%#x\n", R8(0x14));
    for (int round = 0; round < 2; round++) {
        struct hdr *h = (struct hdr *)buf;
        memset(buf, 0, 4096);
        h->op = 8; h->id = round; h->length = 20;  /* GET_ID */
        uint64_t pb = phys(buf);
        d[0] = (struct desc){pb, 32, 1, 1};
        d[1] = (struct desc){pb + 64, 20, 3, 2};
        d[2] = (struct desc){pb + 128, 1, 2, 0};
        if (round == 1) R32(0x301c) = 1;  /* mask vector 1 */
        avail[2 + round] = 0;
        __sync_synchronize();
        avail[1] = round + 1;
        __sync_synchronize();
        R16(0x2000) = 0;  /* doorbell: absorbed by the ioeventfd */
        for (int i = 0; *(volatile uint16_t *)(used + 2) != round + 1; i++) {
            if (i > 2000) fail("completion");
            msleep(1);
        }
        msleep(20);
        printf("round%d used_len=%u status=%u id=%s pba=%#x\n", round,
               *(uint32_t *)(used + 8 + 8 * round), buf[128], (char *)buf + 64, R32(0x3800));
    }
    R32(0x301c) = 0;  /* unmask: the pending vector fires */
    msleep(20);
    printf("unmasked pba=%#x\n", R32(0x3800));
    reset();
    printf("reset queue_size=%u vector=%#x\n", R16(0x18), R16(0x1a));
    return 0;
}
"#;

/// Build the guest program into a cpio archive; `None` when this machine cannot (no gcc with a
/// static libc), so the test says so instead of failing.
fn poke_initrd(dir: &TempDir) -> Option<std::path::PathBuf> {
    let root = dir.0.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let src = dir.0.join("poke.c");
    std::fs::write(&src, POKE_C).unwrap();
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(root.join("bin/aiodma-poke"))
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        return None;
    }
    let archive = dir.0.join("poke.cpio");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find bin bin/aiodma-poke | cpio --quiet -o -H newc > {}",
            root.display(),
            archive.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    Some(archive)
}

#[test]
fn guest_userspace_drives_queue_and_msix_end_to_end() {
    let dir = TempDir::new("device-poke");
    let Some(initrd) = poke_initrd(&dir) else {
        eprintln!("skipped: gcc -static is not available");
        return;
    };
    let metrics = dir.0.join("metrics.json");
    let out = Guest::new()
        .flag("--initrd")
        .flag(initrd.to_str().unwrap())
        .flag("--append")
        .flag("aiodma.nomodule")
        .flag("--metrics")
        .flag(metrics.to_str().unwrap())
        .sh("/bin/aiodma-poke && dmesg | grep -c No.irq.handle[r]");
    out.assert_code(0)
        .assert_stdout_contains("num_queues=1")
        .assert_stdout_contains("capacity=67108864")
        .assert_stdout_contains("features_ok=0xb")
        .assert_stdout_contains("queue_vector=1")
        .assert_stdout_contains("driver_ok=0xf")
        // Unmasked: delivered at once, nothing pending.
        .assert_stdout_contains("round0 used_len=21 status=0 id=aiodma")
        // Masked: the completion still lands; the vector waits in the PBA (bit 1)...
        .assert_stdout_contains("round1 used_len=21 status=0 id=aiodma")
        // ...and fires on unmask.
        .assert_stdout_contains("unmasked pba=0")
        .assert_stdout_contains("reset queue_size=256 vector=0xffff");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("round0 ") && l.ends_with(" pba=0")),
        "{}",
        out.report()
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("round1 ") && l.ends_with(" pba=0x2")),
        "{}",
        out.report()
    );
    // Both MSIs reached the guest's local APIC (vector 0xde has no handler, so Linux logs it;
    // the `[r]` keeps the pattern from matching the command line that dmesg also shows).
    let delivered: u32 = out
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next_back()
        .unwrap_or(0);
    assert_eq!(delivered, 2, "MSIs the guest saw\n{}", out.report());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let d = &v["device"];
    assert_eq!(d["requests"]["get_id"]["requests"], 2, "{v}");
    assert_eq!(d["interrupts"], 2, "{v}");
    assert!(d["doorbells"].as_u64().unwrap() >= 1, "{v}");
    assert!(d["resets"].as_u64().unwrap() >= 1, "{v}");
}
