// js-tiktoken imports the CommonJS package "base64-js"; browsers load ES modules only, so the
// page's import map points "base64-js" here (Node resolves the real package).
export function toByteArray(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
export function fromByteArray(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}
export default { toByteArray, fromByteArray };
