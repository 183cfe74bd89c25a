// Shows the pack's run-time warnings (host.warn_user: e.g. silent audio, a tiny start image) as toasts. The server
// sends them as the custom event "wantalk.warning"; the same text also appears under the running node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
    name: "wantalk.warnings",
    setup() {
        api.addEventListener("wantalk.warning", (event) => {
            app.extensionManager?.toast?.add({
                severity: "warn",
                summary: "wantalk",
                detail: event.detail?.message ?? "",
                life: 10000,
            });
        });
    },
});
