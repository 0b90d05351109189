//! Whether the agent sandbox's tests can run here: bubblewrap must work.

use switchboard::config::{RuntimeKind, SandboxKind, Settings};

/// Whether bubblewrap works here (switchboard's own start check). Without it the sandbox tests
/// print SKIPPED, unless `SWITCHBOARD_REQUIRE_SANDBOX_TESTS=1` (`.ci/run`) makes that a failure.
pub fn bwrap_works() -> bool {
    let mut settings = Settings::defaults();
    settings.runtime.kind = RuntimeKind::Process;
    settings.runtime.process.sandbox = SandboxKind::Bwrap;
    let Err(why) = switchboard::runtime::sandbox::check(&settings) else {
        return true;
    };
    let required = std::env::var("SWITCHBOARD_REQUIRE_SANDBOX_TESTS").is_ok_and(|v| v == "1");
    assert!(!required, "the sandbox tests need bubblewrap: {why}");
    eprintln!("SKIPPED: {why}");
    false
}
