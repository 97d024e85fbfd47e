// "Send my camera": the browser's camera and microphone to a new push stream over WHIP
// (RFC 9725). The stream is created with the console's API key; the publish token it answers
// with is used only for this stream's WHIP URL. The browser is asked for a small, slow video
// (640x480 at most 5 fps): a window keeps 2 frames a second, more would only cost the service
// decoding. No ICE servers: the service's answer carries its own candidates.
"use strict";

const CAM_FPS = 5;
const cam = { pc: null, stream: null, location: null, token: null, url: null, id: null };

function camState(text) { document.getElementById("cam-state").textContent = text; }

function gathered(pc, timeoutMs = 5000) {
  // WHIP without trickle: the offer goes out with every candidate in it
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function startCamera() {
  showError("");
  document.getElementById("cam-start").disabled = true;
  try {
    camState("asking for the camera and microphone...");
    cam.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640, max: 640 }, height: { ideal: 480, max: 480 }, frameRate: { ideal: CAM_FPS, max: CAM_FPS } },
      audio: true });
    document.getElementById("cam-preview").srcObject = cam.stream;
    camState("creating the stream...");
    const name = document.getElementById("cam-name").value.trim();
    const st = await getJSON("v1/streams", { method: "POST", json: name ? { source: "whip:", name } : { source: "whip:" } });
    cam.id = st.id; cam.url = st.ingest.url; cam.token = st.ingest.token;
    cam.pc = new RTCPeerConnection({ iceServers: [] });
    for (const track of cam.stream.getTracks()) {
      const tr = cam.pc.addTransceiver(track, { direction: "sendonly" });
      if (track.kind === "video") {
        const p = tr.sender.getParameters();
        p.encodings = (p.encodings && p.encodings.length ? p.encodings : [{}]).map((e) => ({ ...e, maxFramerate: CAM_FPS }));
        try { await tr.sender.setParameters(p); } catch (e) { /* not before negotiation in some browsers */ }
      }
    }
    cam.pc.addEventListener("connectionstatechange", () => camState("connection: " + cam.pc.connectionState));
    await cam.pc.setLocalDescription(await cam.pc.createOffer());
    await gathered(cam.pc);
    camState("publishing...");
    const r = await fetch(cam.url, { method: "POST", body: cam.pc.localDescription.sdp, cache: "no-store",
                                     headers: { "Content-Type": "application/sdp", "Authorization": "Bearer " + cam.token } });
    if (r.status !== 201) throw new ApiError(await errorOf(r), r.status);
    cam.location = new URL(r.headers.get("Location"), cam.url).toString();
    await cam.pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
    document.getElementById("cam-stop").disabled = false;
    camState("sending to stream " + (st.name || st.id));
    if (typeof refreshStreams === "function") await refreshStreams();
    if (typeof select === "function") select(st.id);
  } catch (e) {
    showError(e.message || String(e));
    await stopCamera(false);
  }
}

async function stopCamera(tell = true) {
  if (tell && cam.location && cam.token) {
    try {
      const r = await fetch(cam.location, { method: "DELETE", headers: { "Authorization": "Bearer " + cam.token } });
      if (!r.ok && r.status !== 404) showError(await errorOf(r));
    } catch (e) { showError(e.message || String(e)); }
  }
  if (cam.pc) cam.pc.close();
  if (cam.stream) for (const t of cam.stream.getTracks()) t.stop();
  document.getElementById("cam-preview").srcObject = null;
  Object.assign(cam, { pc: null, stream: null, location: null, token: null });
  document.getElementById("cam-start").disabled = false;
  document.getElementById("cam-stop").disabled = true;
  if (tell) camState("stopped");
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("cam-start").addEventListener("click", startCamera);
  document.getElementById("cam-stop").addEventListener("click", () => stopCamera(true));
  window.addEventListener("pagehide", () => { if (cam.location) stopCamera(true); });
});
